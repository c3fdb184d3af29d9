"""Wires the ledger, the gRPC server, health, reflection and the background loops together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import tracing
from server.auth import Authenticator
from server.config import ServerConfig
from server.dev_token import ensure_dev_token
from server.handling import CallPolicy
from server.metrics import MetricsEndpoint, ServerMetrics
from server.ratelimit import RateLimitGate, create_rate_limiter
from server.reflection_auth import enable_authenticated_reflection
from server.reflection_docs import DocumentedPool
from server.service import SERVICE_NAME, CreditsService, generic_handler
from server.tls import server_credentials
from store import limits
from store.backlog import read_backlog
from store.cache import (
    BalanceCache,
    LayeredBalanceCache,
    LocalBalanceCache,
    RedisBalanceCache,
)
from store.callers import CallerStore
from store.clock import Clock
from store.database import PoolSettings, create_engine
from store.errors import StoreUnavailable
from store.ledger import Ledger, LedgerSettings
from store.migrate import migrate

log = logging.getLogger("credits.server")

# A database ping slower than this counts as "unreachable" for the health service.
HEALTH_PING_TIMEOUT_SECONDS = 2.0
# The health service name of liveness probes: SERVING while the process runs (the default
# service "" and credits.v1.CreditsService follow the database, for readiness).
LIVENESS_SERVICE = "liveness"
# On shutdown, closing the cache client or the database pool may take at most this long each.
CLOSE_TIMEOUT_SECONDS = 5.0


def _balance_cache(config: ServerConfig) -> BalanceCache:
    if not config.redis_url:
        return LocalBalanceCache()
    shared = RedisBalanceCache(
        config.redis_url, namespace=config.redis_namespace, timeout_ms=config.redis_timeout_ms
    )
    if config.near_cache_ms == 0:
        return shared
    return LayeredBalanceCache(shared, config.near_cache_ms)


class CreditsApp:
    def __init__(self, config: ServerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.engine = create_engine(config.database_url, PoolSettings(size=config.db_pool_size))
        self.cache = _balance_cache(config)
        self.rate_gate = RateLimitGate(
            create_rate_limiter(
                config.redis_url,
                namespace=config.redis_namespace,
                timeout_ms=config.redis_timeout_ms,
            ),
            config.rate_limits,
        )
        self.ledger = Ledger(
            self.engine,
            clock,
            LedgerSettings(
                hold_ttl_seconds_default=config.hold_ttl_seconds_default,
                hold_ttl_seconds_max=config.hold_ttl_seconds_max,
                batch_fill_wait_ms=config.batch_fill_wait_ms,
                wallet_copies=config.wallet_copies,
            ),
            cache=self.cache,
            admission=self.rate_gate.admit,
        )
        self.callers = CallerStore(self.ledger.transactor, self.ledger.clock)
        self.authenticator = Authenticator(self.callers, config.auth_cache_ttl_seconds)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.metrics = ServerMetrics(
            self.cache,
            "redis" if config.redis_url else "local",
            self.engine,
            self.ledger.reserve_batcher,
            self.ledger.batch_connections,
        )
        self.metrics_endpoint = MetricsEndpoint(self.metrics)
        self.metrics_port = 0
        self.tracer_provider = tracing.start(config.otlp_endpoint)
        self.server = grpc.aio.server(
            interceptors=tracing.server_interceptors(self.tracer_provider),
            options=[
                ("grpc.max_receive_message_length", limits.REQUEST_BYTES_MAX),
                # Refuse to share the port: two servers on one address is a deployment mistake.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.port = 0
        self.service: CreditsService | None = None  # once started
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        if self.config.migrate_on_start:
            await migrate(self.engine)
        await ensure_dev_token(self.callers, self.config.database_url, self.config.dev_token)
        batched = frozenset(
            method
            for method, batcher in (
                ("Reserve", self.ledger.reserve_batcher),
                ("Commit", self.ledger.resolve_batcher),
                ("Release", self.ledger.resolve_batcher),
            )
            if batcher is not None
        )
        policy = CallPolicy(self.authenticator, self.rate_gate, limited_by_ledger=batched)
        service = self.service = CreditsService(self.ledger, policy)
        self.server.add_generic_rpc_handlers((generic_handler(service),))
        # Health needs no credential: load balancers and orchestrators probe it.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            reflected = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            if self.config.reflection_requires_auth:
                enable_authenticated_reflection(
                    reflected, self.server, DocumentedPool(), self.authenticator
                )
            else:
                reflection.enable_server_reflection(
                    reflected,
                    self.server,
                    # Duck-typed: the adapter answers the lookups reflection makes (its module).
                    pool=DocumentedPool(),  # type: ignore[arg-type]
                )
        credentials = server_credentials(self.config)
        self.port = (
            self.server.add_insecure_port(self.config.listen)
            if credentials is None
            else self.server.add_secure_port(self.config.listen, credentials)
        )
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.config.listen}")
        if self.config.metrics_listen:
            self.metrics_port = await self.metrics_endpoint.start(self.config.metrics_listen)
        await self._probe_database()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="health-probe"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
        ]
        if self.config.metrics_listen:
            self._tasks.append(asyncio.create_task(self._metrics_loop(), name="metrics-refresh"))
        log.info("serving", extra={"fields": {"listen": self.config.listen, "port": self.port}})
        return self.port

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish within the grace period, then
        stops the background loops and closes the database pool."""
        grace = self.config.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.metrics_endpoint.stop()
        try:
            # The span exporter blocks while it flushes; a collector that is down must not
            # hold shutdown hostage either.
            await asyncio.wait_for(
                asyncio.to_thread(tracing.stop, self.tracer_provider), CLOSE_TIMEOUT_SECONDS
            )
        except TimeoutError:
            log.warning("flushing traces took over %s s; abandoned", CLOSE_TIMEOUT_SECONDS)
        # Bounded: a connection left half-open by a network fault must not hold shutdown hostage.
        for name, closing in (
            ("reserve batches", self.ledger.close()),
            ("cache and rate limiter", asyncio.gather(self.cache.close(), self.rate_gate.close())),
            ("database pool", self.engine.dispose()),
        ):
            try:
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("closing the %s took over %s s; abandoned", name, CLOSE_TIMEOUT_SECONDS)
        log.info("stopped")

    async def _probe_database(self) -> bool:
        try:
            await asyncio.wait_for(self.ledger.ping(), HEALTH_PING_TIMEOUT_SECONDS)
            healthy = True
        except (StoreUnavailable, TimeoutError):
            healthy = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        # Liveness probes ask this one: the process answers, whatever the database does, so an
        # outage of the database makes replicas unready, not restarted.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.set_serving(healthy)
        return healthy

    async def _health_loop(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(self.config.health_probe_interval_seconds)
            now_healthy = await self._probe_database()
            if now_healthy != healthy:
                log.warning("database %s", "reachable again" if now_healthy else "unreachable")
                healthy = now_healthy

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_seconds)
            try:
                holds = await self.ledger.sweep_expired_holds()
                grants = await self.ledger.sweep_expired_grants()
                keys = await self.ledger.prune_idempotency_keys()
                self.metrics.observe_sweep(holds, grants, keys)
                if holds or grants or keys:
                    log.info(
                        "swept",
                        extra={
                            "fields": {
                                "holds_expired": holds,
                                "grants_expired": grants,
                                "keys_pruned": keys,
                            }
                        },
                    )
            except StoreUnavailable:
                self.metrics.observe_sweep_failure("unavailable")
                log.warning("sweeper skipped a pass: database unavailable")
            except Exception:
                self.metrics.observe_sweep_failure("error")
                log.exception("sweeper pass failed")

    async def refresh_metrics(self) -> None:
        """Reads the reservation and sweeper gauges from the database (the metrics loop calls
        it every --metrics-refresh-seconds; tests call it to read them at once)."""
        backlog = await read_backlog(self.ledger.transactor, self.ledger.clock.now_us())
        self.metrics.observe_backlog(backlog)

    async def _metrics_loop(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except StoreUnavailable:
                # The gauges keep their last values; credits_backlog_refreshed_timestamp_seconds
                # shows how old they are.
                log.warning("metrics refresh skipped: database unavailable")
            except Exception:
                log.exception("metrics refresh failed")
            await asyncio.sleep(self.config.metrics_refresh_interval_seconds)
