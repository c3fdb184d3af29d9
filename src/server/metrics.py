"""Prometheus metrics of the server, and the HTTP endpoint that serves them (docs/operations.md,
"Metrics", lists every metric and the alerts to set on them).

Two kinds of metric, for two reasons:

- The RPC latency histogram and call counter are process-wide (module-level collectors):
  `run_rpc()` is a free function that every RPC goes through, and a process serves one
  CreditsService. They are registered into each server's registry, so several servers in one
  process (tests) each export them; a test compares before and after.
- Everything else belongs to one CreditsApp and its own CollectorRegistry: the backlog gauges it
  refreshes from its database, its sweeper's counters, its cache's counters, its pool. Nothing
  is registered in prometheus_client's global registry.

Scrapes run on the event loop (an aiohttp handler); rendering is in-memory work only. The
database is read by the app's refresh loop, never by a scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from store.backlog import Backlog
from store.batch_pool import BatchConnections
from store.cache import BalanceCache
from store.histogram import LATENCY_BUCKETS_SECONDS, Histogram
from store.reserve_batch import ReserveBatcher

log = logging.getLogger("credits.metrics")

# Calls of one (method, code): the counter is the histogram's count. Plain numbers, no lock: that
# took a call's metrics from 1.35 us to about a third of it, on every RPC (docs/performance.md).
_rpc_calls: dict[tuple[str, str], Histogram] = {}


def observe_rpc(method: str, code: str, elapsed_seconds: float) -> None:
    """Counts one finished call. `method` is one of the service's method names and `code` a
    gRPC code name, so the label sets stay few (methods x codes)."""
    calls = _rpc_calls.get((method, code))
    if calls is None:
        calls = _rpc_calls[(method, code)] = Histogram()
    calls.observe(elapsed_seconds)


class _RpcCollector(Collector):
    """Exports the process-wide RPC counts: credits_rpc_handled_total and the
    credits_rpc_duration_seconds histogram, by method and code."""

    def collect(self) -> Iterable[Metric]:
        handled = CounterMetricFamily(
            "credits_rpc_handled",
            "CreditsService calls completed, by method and gRPC code",
            labels=("method", "code"),
        )
        latency = HistogramMetricFamily(
            "credits_rpc_duration_seconds",
            "Time from the start to the end of each CreditsService call, by method and gRPC code",
            labels=("method", "code"),
        )
        for (method, code), calls in sorted(_rpc_calls.items()):
            handled.add_metric((method, code), calls.cumulative()[-1])
            _add_histogram(latency, (method, code), calls)
        yield handled
        yield latency


# Bucket labels as prometheus_client writes them ("0.0005", "1.0"; untyped upstream).
_BUCKET_LABELS = [*(floatToGoString(b) for b in LATENCY_BUCKETS_SECONDS), "+Inf"]  # type: ignore[no-untyped-call]


def _add_histogram(
    family: HistogramMetricFamily, labels: tuple[str, ...], histogram: Histogram
) -> None:
    buckets = list(zip(_BUCKET_LABELS, histogram.cumulative(), strict=True))
    family.add_metric(labels, buckets, histogram.sum_seconds)


_RPC_COLLECTOR = _RpcCollector()


class ServerMetrics:
    """One server's registry: the process-wide RPC metrics plus this app's own."""

    def __init__(
        self,
        cache: BalanceCache,
        cache_backend: str,
        engine: AsyncEngine,
        reserve_batcher: ReserveBatcher | None = None,
        batch_connections: BatchConnections | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        for collector in (
            _RPC_COLLECTOR,
            _CacheCollector(cache, cache_backend),
            _ReserveBatchCollector(reserve_batcher),
            _PoolCollector(engine, batch_connections),
            PROCESS_COLLECTOR,
            PLATFORM_COLLECTOR,
            GC_COLLECTOR,
        ):
            self.registry.register(collector)
        r = self.registry
        self._health_serving = Gauge(
            "credits_health_serving",
            "1 when the health service reports SERVING (the database answered the last probe)",
            registry=r,
        )
        self._reservations_pending = Gauge(
            "credits_reservations_pending",
            "Reservations pending in the database (all replicas), counted up to "
            "BACKLOG_PENDING_SCAN_MAX",
            registry=r,
        )
        self._oldest_pending_age = Gauge(
            "credits_reservations_oldest_pending_age_seconds",
            "Age of the oldest pending reservation (0 when none)",
            registry=r,
        )
        self._sweep_lag = Gauge(
            "credits_sweeper_lag_seconds",
            "How long the most overdue pending hold (kind=hold) or grant with credits left "
            "(kind=grant) has been past its expiry without a sweeper expiring it (0 when none)",
            ("kind",),
            registry=r,
        )
        self._backlog_refreshed = Gauge(
            "credits_backlog_refreshed_timestamp_seconds",
            "Unix time of the last successful refresh of the reservation and sweeper gauges",
            registry=r,
        )
        self._sweep_last_pass = Gauge(
            "credits_sweeper_last_pass_timestamp_seconds",
            "Unix time this process's sweeper last completed a pass",
            registry=r,
        )
        self._swept = Counter(
            "credits_sweeper_expired",
            "Holds (kind=hold) and grants (kind=grant) this process's sweeper expired",
            ("kind",),
            registry=r,
        )
        self._keys_pruned = Counter(
            "credits_sweeper_idempotency_keys_pruned",
            "Idempotency keys past their retention that this process's sweeper deleted",
            registry=r,
        )
        self._sweep_failures = Counter(
            "credits_sweeper_pass_failures",
            "Sweeper passes that failed: database unavailable (reason=unavailable) or any "
            "other error (reason=error, logged with its traceback)",
            ("reason",),
            registry=r,
        )
        for kind in ("hold", "grant"):
            self._sweep_lag.labels(kind)
            self._swept.labels(kind)
        for reason in ("unavailable", "error"):
            self._sweep_failures.labels(reason)

    def set_serving(self, serving: bool) -> None:
        self._health_serving.set(1 if serving else 0)

    def observe_backlog(self, backlog: Backlog) -> None:
        self._reservations_pending.set(backlog.reservations_pending)
        self._oldest_pending_age.set(backlog.oldest_pending_age_seconds)
        self._sweep_lag.labels("hold").set(backlog.hold_sweep_lag_seconds)
        self._sweep_lag.labels("grant").set(backlog.grant_sweep_lag_seconds)
        self._backlog_refreshed.set(time.time())

    def observe_sweep(self, holds_expired: int, grants_expired: int, keys_pruned: int) -> None:
        self._swept.labels("hold").inc(holds_expired)
        self._swept.labels("grant").inc(grants_expired)
        self._keys_pruned.inc(keys_pruned)
        self._sweep_last_pass.set(time.time())

    def observe_sweep_failure(self, reason: str) -> None:
        assert reason in ("unavailable", "error"), reason
        self._sweep_failures.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """The balance cache's own counters (store/cache.py CacheCounters), read at scrape time:
    the hot path keeps incrementing plain integers and pays nothing for the export."""

    def __init__(self, cache: BalanceCache, backend: str) -> None:
        self._cache = cache
        self._backend = backend

    def collect(self) -> Iterable[Metric]:
        counters = self._cache.counters
        lookups = CounterMetricFamily(
            "credits_balance_cache_lookups",
            "CheckCredits cache lookups: hit (served from the cache), miss (no copy), stale "
            "(a copy past its valid_until); consistent reads skip the cache and are not counted",
            labels=("backend", "result"),
        )
        for result, count in (
            ("hit", counters.hits),
            ("miss", counters.misses),
            ("stale", counters.stale),
        ):
            lookups.add_metric((self._backend, result), count)
        errors = CounterMetricFamily(
            "credits_balance_cache_errors",
            "Cache calls that failed or exceeded --redis-timeout-ms (the database answered)",
            labels=("backend",),
        )
        errors.add_metric((self._backend,), counters.errors)
        writes = CounterMetricFamily(
            "credits_balance_cache_writes",
            "Snapshot writes: stored, or refused_older (a newer copy was already there)",
            labels=("backend", "result"),
        )
        writes.add_metric((self._backend, "stored"), counters.writes)
        writes.add_metric((self._backend, "refused_older"), counters.writes_refused_as_older)
        near = CounterMetricFamily(
            "credits_balance_cache_near_hits",
            "Hits answered by the in-process copy in front of Redis (--near-cache-ms), no round "
            "trip; also counted as hits",
            labels=("backend",),
        )
        near.add_metric((self._backend,), counters.near_hits)
        refreshes = CounterMetricFamily(
            "credits_balance_cache_near_refreshes",
            "In-process copies read again from Redis late in their life, behind their readers, "
            "so that a wallet read all the time never makes a reader wait for Redis (each is also "
            "counted as a lookup)",
            labels=("backend",),
        )
        refreshes.add_metric((self._backend,), counters.near_refreshes)
        return (lookups, errors, writes, near, refreshes)


class _ReserveBatchCollector(Collector):
    """Reserve batching on Postgres (store/reserve_batch.py), read at scrape time."""

    def __init__(self, batcher: ReserveBatcher | None) -> None:
        self._batcher = batcher

    def collect(self) -> Iterable[Metric]:
        if self._batcher is None:
            return ()
        counters = self._batcher.counters
        batches = CounterMetricFamily(
            "credits_reserve_batches",
            "Reserve transactions run by the batcher; requests/batches is the mean batch size",
        )
        batches.add_metric((), counters.batches)
        requests = CounterMetricFamily(
            "credits_reserve_batch_requests", "Reserve calls that went into a batch"
        )
        requests.add_metric((), counters.requests)
        failed = CounterMetricFamily(
            "credits_reserve_batch_failures",
            "Batches whose transaction failed; their calls went one by one (alert if rising)",
        )
        failed.add_metric((), counters.failed_batches)
        handed_back = CounterMetricFamily(
            "credits_reserve_batch_handed_back",
            "Calls the batch left to the one-call path: replayed keys, duplicates, failed batches",
        )
        handed_back.add_metric((), counters.handed_back)
        locking = CounterMetricFamily(
            "credits_reserve_batch_locking_retries",
            "Batches that found a wallet moved or held since their read and settled its calls "
            "on the locking path (contention on a wallet from elsewhere)",
        )
        locking.add_metric((), counters.lost_compare_and_set)
        copies = self._batcher.copies
        copy_decisions = CounterMetricFamily(
            "credits_reserve_batch_copy_decisions",
            "Batches decided on this process's copies of their wallets, without reading them "
            "(one round trip to Postgres instead of two)",
        )
        copy_decisions.add_metric((), copies.decided)
        copy_rereads = CounterMetricFamily(
            "credits_reserve_batch_copy_rereads",
            "Of those, batches that read their wallets after all: a copy behind another "
            "replica's write, a key stored already, or a refusal among the calls",
        )
        copy_rereads.add_metric((), copies.reread)
        filled = CounterMetricFamily(
            "credits_reserve_batch_fill_waits",
            "Batches that waited (up to --batch-fill-wait-ms) for calls to fill them because "
            "the event loop's thread was saturated (bigger batches cost less CPU per call)",
        )
        filled.add_metric((), counters.filled)
        loop_share = GaugeMetricFamily(
            "credits_event_loop_cpu_share",
            "Share of wall time the event loop's thread spent on the CPU lately, as the Reserve "
            "batcher last measured it (near 1: the process is saturated)",
        )
        loop_share.add_metric((), self._batcher.loop_cpu_share)
        queued = HistogramMetricFamily(
            "credits_reserve_batch_queue_seconds",
            "How long each batched Reserve call waited for its batch to start (rising with load "
            "while batch_duration stays: calls queue behind the batch in flight)",
        )
        _add_histogram(queued, (), self._batcher.queue_seconds)
        duration = HistogramMetricFamily(
            "credits_reserve_batch_duration_seconds",
            "How long each Reserve batch took from its start to its commit (its database round "
            "trips, rate check and decisions; a slow database shows here)",
        )
        _add_histogram(duration, (), self._batcher.batch_seconds)
        return (batches, requests, failed, handed_back, locking, copy_decisions, copy_rereads,
                filled, loop_share, queued, duration)  # fmt: skip


class _PoolCollector(Collector):
    """Database connections, read at scrape time: the pool's, and the group-commit batches'
    own (store/batch_pool.py) when the server batches."""

    def __init__(self, engine: AsyncEngine, batch_connections: BatchConnections | None) -> None:
        self._engine = engine
        self._batch_connections = batch_connections

    def collect(self) -> Iterable[Metric]:
        pool = self._engine.pool
        if isinstance(pool, QueuePool):
            yield GaugeMetricFamily(
                "credits_db_pool_connections_in_use",
                "Database connections checked out of this process's pool",
                value=pool.checkedout(),
            )
            yield GaugeMetricFamily(
                "credits_db_pool_size",
                "Connections the pool keeps open (--db-pool-size); more open on overflow",
                value=pool.size(),
            )
        if self._batch_connections is not None:
            opened, in_use = self._batch_connections.connections()
            batch = GaugeMetricFamily(
                "credits_db_batch_connections",
                "Connections of the group-commit batches, beside the pool (at most "
                "BATCH_CONNECTIONS_MAX + BATCH_GENERIC_CONNECTIONS_MAX): open, and in use by "
                "a batch",
                labels=("state",),
            )
            batch.add_metric(("open",), opened)
            batch.add_metric(("in_use",), in_use)
            yield batch


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); ValueError when it is not one."""
    host, separator, port = listen.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.strip("[]"), int(port)


class MetricsEndpoint:
    """GET /metrics over HTTP on its own address, apart from the gRPC port."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, listen: str) -> int:
        """Serves on `listen` (port 0: any free port); returns the bound port."""
        host, port = split_listen(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("metrics served", extra={"fields": {"listen": listen, "port": self.port}})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
