"""Metrics and traces, read the way Prometheus and a trace collector would: scraped over HTTP
from a running server and a running listener, and exported by the server's own tracer."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
import stripe_events as se
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from processes import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_billing import (
    API_KEY,
    PACK,
    PACK_AI,
    PACK_ONLY_TOML,
    SECRET,
    Listener,
    config_toml,
)

from billing import config as billing_config
from billing.app import ListenerApp
from billing.config import Overrides
from credits.v1 import credits_pb2 as pb
from server import config as server_config
from server import tracing
from store import limits
from store.clock import ManualClock

Accounts = Callable[[str], str]
LabelSet = frozenset[tuple[str, str]]
METHOD_CODES = (
    ("AddCredits", "OK"),
    ("CheckCredits", "OK"),
    ("CheckCredits", "INVALID_ARGUMENT"),
    ("Reserve", "OK"),
    ("Reserve", "FAILED_PRECONDITION"),
    ("Commit", "NOT_FOUND"),
)


class Scrape:
    """One scrape's samples, looked up by name and labels (0 when absent, like a rate of it)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, LabelSet], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


async def scrape_server(server: Any, *, refresh: bool = False) -> Scrape:
    if refresh:
        await server.app.refresh_metrics()
    return await scrape(f"http://127.0.0.1:{server.app.metrics_port}/metrics")


def grant(account: str, amount: int, key: str) -> pb.AddCreditsRequest:
    return pb.AddCreditsRequest(
        account_id=account, amount=amount, idempotency_key=key, source=pb.GRANT_SOURCE_PURCHASE
    )


async def fails_with(call: Awaitable[object], code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code


# ---- the server ---------------------------------------------------------------------------------


async def test_rpc_latency_and_counts_are_served_by_method_and_code(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url, metrics_listen="127.0.0.1:0")
    assert server.app.metrics_port not in (0, server.app.port)
    account = accounts("rpc")
    before = await scrape_server(server)

    await server.stub.AddCredits(grant(account, 100, "buy"))
    await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, amount=10))
    await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, amount=10))
    await fails_with(
        server.stub.CheckCredits(pb.CheckCreditsRequest(account_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await server.stub.Reserve(pb.ReserveRequest(account_id=account, amount=60, idempotency_key="r"))
    await fails_with(
        server.stub.Reserve(pb.ReserveRequest(account_id=account, amount=60, idempotency_key="x")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await fails_with(
        server.stub.Commit(pb.CommitRequest(account_id=account, reservation_id="rsv_" + "0" * 32)),
        grpc.StatusCode.NOT_FOUND,
    )

    after = await scrape_server(server)
    expected = {
        ("AddCredits", "OK"): 1,
        ("CheckCredits", "OK"): 2,
        ("CheckCredits", "INVALID_ARGUMENT"): 1,
        ("Reserve", "OK"): 1,
        ("Reserve", "FAILED_PRECONDITION"): 1,
        ("Commit", "NOT_FOUND"): 1,
    }
    for (method, code), count in expected.items():
        labels = {"method": method, "code": code}
        handled = "credits_rpc_handled_total"
        assert after.value(handled, **labels) - before.value(handled, **labels) == count
        observed = "credits_rpc_duration_seconds_count"
        assert after.value(observed, **labels) - before.value(observed, **labels) == count
        # Every call took some time, and each fell in a bucket at or below the last (10 s).
        seconds = "credits_rpc_duration_seconds_sum"
        assert after.value(seconds, **labels) > before.value(seconds, **labels)
        last_bucket = "credits_rpc_duration_seconds_bucket"
        assert (
            after.value(last_bucket, **labels, le="10.0")
            - before.value(last_bucket, **labels, le="10.0")
            == count
        )
    assert after.value("credits_rpc_handled_total", method="Release", code="OK") == before.value(
        "credits_rpc_handled_total", method="Release", code="OK"
    )
    assert after.value("credits_health_serving") == 1
    assert after.value("credits_db_pool_size") >= 1
    if database_url.startswith("postgres"):  # the Reserve above went in a batch
        assert after.value("credits_db_batch_connections", state="open") >= 1
        # Two lone calls on an idle server: neither batch waited to fill.
        assert after.value("credits_reserve_batch_fill_waits_total") == 0
        # The second Reserve was decided on the copy the first left, and refused there: a
        # refusal is decided again on a read.
        assert after.value("credits_reserve_batch_copy_decisions_total") == 1
        assert after.value("credits_reserve_batch_copy_rereads_total") == 1
        assert 0 <= after.value("credits_event_loop_cpu_share") < 1
        # Each call waited for its batch once, each batch was timed once, and every wait and
        # batch took some time, at most the last bucket's (10 s).
        for name in (
            "credits_reserve_batch_queue_seconds",
            "credits_reserve_batch_duration_seconds",
        ):
            assert after.value(f"{name}_count") == after.value(f"{name}_bucket", le="10.0") == 2
            assert after.value(f"{name}_sum") > 0
        # A call's wait and its batch are parts of the call's time.
        reserve_seconds = sum(
            after.value("credits_rpc_duration_seconds_sum", method="Reserve", code=code)
            - before.value("credits_rpc_duration_seconds_sum", method="Reserve", code=code)
            for code in ("OK", "FAILED_PRECONDITION")
        )
        batched_seconds = after.value("credits_reserve_batch_queue_seconds_sum") + after.value(
            "credits_reserve_batch_duration_seconds_sum"
        )
        assert batched_seconds < reserve_seconds
    else:
        assert not after.has("credits_db_batch_connections")
        assert not after.has("credits_reserve_batch_fill_waits_total")
        assert not after.has("credits_reserve_batch_duration_seconds_count")
    assert after.has("process_resident_memory_bytes")


async def test_pending_reservations_gauge_counts_a_hold_until_it_is_released(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url, metrics_listen="127.0.0.1:0")
    account = accounts("pending")
    await server.stub.AddCredits(grant(account, 100, "buy"))
    # Other tests' holds share the database: compare with the count before this test's hold.
    before = await scrape_server(server, refresh=True)

    reserved = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=30, idempotency_key="r", ttl_seconds=600)
    )
    held = await scrape_server(server, refresh=True)
    assert (
        held.value("credits_reservations_pending")
        == before.value("credits_reservations_pending") + 1
    )
    assert held.value("credits_reservations_oldest_pending_age_seconds") >= 0
    assert held.value("credits_backlog_refreshed_timestamp_seconds") >= time.time() - 60

    await server.stub.Release(
        pb.ReleaseRequest(account_id=account, reservation_id=reserved.reservation.reservation_id)
    )
    released = await scrape_server(server, refresh=True)
    assert released.value("credits_reservations_pending") == before.value(
        "credits_reservations_pending"
    )


async def test_sweeper_lag_is_how_long_a_hold_has_been_overdue_until_it_is_swept(
    start_server: Any, database_url: str, clock: ManualClock, accounts: Accounts
) -> None:
    server = await start_server(database_url, clock, metrics_listen="127.0.0.1:0")
    account = accounts("lag")
    await server.stub.AddCredits(grant(account, 100, "buy"))
    await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=30, idempotency_key="r", ttl_seconds=60)
    )
    clock.advance_seconds(180)

    overdue = await scrape_server(server, refresh=True)
    # At least this hold's 120 s; older leftovers of other tests can only make it more.
    assert overdue.value("credits_sweeper_lag_seconds", kind="hold") >= 120

    while await server.app.ledger.sweep_expired_holds():
        pass
    swept = await scrape_server(server, refresh=True)
    assert swept.value("credits_sweeper_lag_seconds", kind="hold") == 0
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (balance.available, balance.reserved) == (100, 0)


async def test_sweeper_loop_counts_its_passes_and_the_holds_it_expires(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(
        database_url, sweep_interval_seconds=0.1, metrics_listen="127.0.0.1:0"
    )
    account = accounts("sweep")
    before = await scrape_server(server)
    await server.stub.AddCredits(grant(account, 100, "buy"))
    await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=30, idempotency_key="r", ttl_seconds=1)
    )
    deadline = time.monotonic() + 20
    while True:
        now = await scrape_server(server)
        expired = now.value("credits_sweeper_expired_total", kind="hold") - before.value(
            "credits_sweeper_expired_total", kind="hold"
        )
        if expired >= 1:
            break
        assert time.monotonic() < deadline, "the sweeper expired nothing in 20 s"
        await asyncio.sleep(0.1)
    assert now.value("credits_sweeper_last_pass_timestamp_seconds") >= time.time() - 60
    assert now.value("credits_sweeper_pass_failures_total", reason="error") == before.value(
        "credits_sweeper_pass_failures_total", reason="error"
    )


async def test_cache_counters_count_misses_hits_stale_copies_and_redis_errors(
    start_server: Any, sqlite_url: str, clock: ManualClock, accounts: Accounts
) -> None:
    local = await start_server(sqlite_url, clock, metrics_listen="127.0.0.1:0")

    async def lookups(result: str) -> float:
        scraped = await scrape_server(local)
        return scraped.value("credits_balance_cache_lookups_total", backend="local", result=result)

    unknown = accounts("unknown")
    check = pb.CheckCreditsRequest(account_id=unknown)
    await local.stub.CheckCredits(check)  # no copy yet: a miss, which fills the cache
    assert (await lookups("miss"), await lookups("hit")) == (1, 0)
    await local.stub.CheckCredits(check)
    assert (await lookups("miss"), await lookups("hit")) == (1, 1)

    expiring = accounts("expiring")
    request = grant(expiring, 50, "promo")
    request.expires_at.FromMicroseconds(clock.now_us() + 60_000_000)
    await local.stub.AddCredits(request)
    clock.advance_seconds(61)  # the copy was true until the grant expired; no longer
    balance = await local.stub.CheckCredits(pb.CheckCreditsRequest(account_id=expiring))
    assert (balance.available, balance.cached) == (0, False)
    assert await lookups("stale") == 1

    # A Redis that is not there: the database answers, and the failure is counted.
    dead_redis = await start_server(
        sqlite_url, redis_url=f"redis://127.0.0.1:{free_port()}/0", metrics_listen="127.0.0.1:0"
    )
    await dead_redis.stub.CheckCredits(check)
    scraped = await scrape_server(dead_redis)
    assert scraped.value("credits_balance_cache_errors_total", backend="redis") == 1
    assert scraped.value("credits_balance_cache_lookups_total", backend="redis", result="miss") == 1


def test_metrics_and_tracing_flags_default_off_and_refuse_a_bad_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in (
        "CREDITS_METRICS_LISTEN",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(variable, raising=False)
    _, config = server_config.load([])
    assert (config.metrics_listen, config.otlp_endpoint) == ("", "")
    assert tracing.start(config.otlp_endpoint) is None
    assert tracing.server_interceptors(None) == []

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    _, config = server_config.load(["--metrics-listen", "0.0.0.0:9464"])
    assert (config.metrics_listen, config.otlp_endpoint) == (
        "0.0.0.0:9464",
        "http://collector:4317",
    )
    with pytest.raises(SystemExit):
        server_config.load(["--metrics-listen", "9464"])


def assert_flag_read_and_bounded(
    monkeypatch: pytest.MonkeyPatch, flag: str, variable: str, field: str, default: int, top: int
) -> None:
    """`flag` defaults to `default`, takes 0 from `variable`, and refuses -1 and `top` + 1."""
    monkeypatch.delenv(variable, raising=False)
    _, config = server_config.load([])
    assert getattr(config, field) == default
    monkeypatch.setenv(variable, "0")
    _, config = server_config.load([])
    assert getattr(config, field) == 0
    for bad in ("-1", str(top + 1)):
        with pytest.raises(SystemExit):
            server_config.load([flag, bad])


async def test_the_batch_fill_wait_flag_reaches_the_batchers_and_is_bounded(
    monkeypatch: pytest.MonkeyPatch, start_server: Any, postgres_url: str
) -> None:
    assert_flag_read_and_bounded(
        monkeypatch,
        "--batch-fill-wait-ms",
        "CREDITS_BATCH_FILL_WAIT_MS",
        "batch_fill_wait_ms",
        limits.BATCH_FILL_WAIT_MS_DEFAULT,
        limits.BATCH_FILL_WAIT_MS_MAX,
    )
    server = await start_server(postgres_url, batch_fill_wait_ms=12)
    ledger = server.app.ledger
    assert ledger.reserve_batcher is not None and ledger.resolve_batcher is not None
    assert ledger.reserve_batcher.fill_wait_seconds == ledger.resolve_batcher.fill_wait_seconds
    assert ledger.reserve_batcher.fill_wait_seconds == 0.012


async def test_the_wallet_copies_flag_reaches_the_batchers_and_is_bounded(
    monkeypatch: pytest.MonkeyPatch, start_server: Any, postgres_url: str, accounts: Accounts
) -> None:
    assert_flag_read_and_bounded(
        monkeypatch,
        "--wallet-copies",
        "CREDITS_WALLET_COPIES",
        "wallet_copies",
        limits.WALLET_COPIES_DEFAULT,
        limits.WALLET_COPIES_MAX,
    )

    # 0: a wallet written by a batch leaves no copy, and the next Reserve reads it.
    server = await start_server(postgres_url, wallet_copies=0)
    ledger = server.app.ledger
    assert ledger.reserve_batcher is not None and ledger.resolve_batcher is not None
    assert ledger.reserve_batcher.copies is ledger.resolve_batcher.copies is ledger.wallet_copies
    account = accounts("nocopy")
    await server.stub.AddCredits(grant(account, 100, "buy"))
    for key in ("r1", "r2"):
        await server.stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=1, idempotency_key=key)
        )
    assert len(ledger.wallet_copies) == 0 and ledger.wallet_copies.decided == 0


# ---- tracing ------------------------------------------------------------------------------------


async def test_tracing_exports_one_server_span_per_call_continuing_the_callers_trace(
    start_server: Any, sqlite_url: str, accounts: Accounts
) -> None:
    exported = InMemorySpanExporter()
    with tracing.exporting_to(exported):
        server = await start_server(sqlite_url)
    assert server.app.tracer_provider is not None
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span_id = "00f067aa0ba902b7"
    await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=accounts("traced")),
        metadata=(("traceparent", f"00-{trace_id}-{caller_span_id}-01"),),
    )
    await fails_with(
        server.stub.CheckCredits(pb.CheckCreditsRequest(account_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert server.app.tracer_provider.force_flush(5_000)

    spans: list[ReadableSpan] = list(exported.get_finished_spans())
    assert [span.name for span in spans] == ["/credits.v1.CreditsService/CheckCredits"] * 2
    ok, invalid = spans
    assert all(span.kind is SpanKind.SERVER for span in spans)
    assert ok.resource.attributes["service.name"] == "credits-server"
    assert ok.attributes is not None and invalid.attributes is not None
    assert (ok.attributes["rpc.grpc.status_code"], invalid.attributes["rpc.grpc.status_code"]) == (
        grpc.StatusCode.OK.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    )
    assert ok.context is not None and ok.parent is not None
    assert (f"{ok.context.trace_id:032x}", f"{ok.parent.span_id:016x}") == (
        trace_id,
        caller_span_id,
    )


# ---- the Stripe listener ------------------------------------------------------------------------


@pytest.fixture
async def listener(tmp_path: pathlib.Path) -> AsyncIterator[Listener]:
    """A listener whose credits server is not there and whose config lacks the AI pack: a pack
    purchase stays pending (retried), an AI pack purchase is parked at once, and an event type
    it does not act on is ignored."""
    fake_stripe = se.FakeStripe(api_key=API_KEY)
    await fake_stripe.start()
    path = tmp_path / "listener.toml"
    path.write_text(config_toml(fake_stripe.url, packs=PACK_ONLY_TOML, attempts_max=100))
    config = billing_config.load(
        path,
        {billing_config.ENV_SIGNING_SECRETS: SECRET, billing_config.ENV_API_KEY: API_KEY},
        Overrides(
            listen="127.0.0.1:0",
            credits_address=f"127.0.0.1:{free_port()}",
            database_url=f"sqlite:///{tmp_path / 'listener.db'}",
        ),
    )
    app = ListenerApp(config, migrate_on_start=True)
    port = await app.start()
    running = Listener(app, f"http://127.0.0.1:{port}", aiohttp.ClientSession(), path)
    running.fake_stripe = fake_stripe  # type: ignore[attr-defined]
    yield running
    await running.http.close()
    await app.stop()
    await fake_stripe.stop()


async def test_listener_metrics_show_inbox_depth_parked_events_and_outcomes(
    listener: Listener, accounts: Accounts
) -> None:
    fake_stripe: se.FakeStripe = listener.fake_stripe  # type: ignore[attr-defined]
    ignored = se.event("customer.created", se.fixture("customer"))
    unknown_pack, pack = se.new_id("cs"), se.new_id("cs")
    fake_stripe.register(unknown_pack, [(PACK_AI, 1)])
    fake_stripe.register(pack, [(PACK, 1)])
    parked = se.event("checkout.session.completed", se.checkout_session(unknown_pack, accounts()))
    pending = se.event("checkout.session.completed", se.checkout_session(pack, accounts()))
    for event in (ignored, parked, pending):
        status, _ = await listener.deliver(event)
        assert status == 200
    await listener.settled(ignored["id"], parked["id"])
    deadline = time.monotonic() + 20
    while (stored := await listener.app.inbox.get(pending["id"])) is None or stored.attempts < 2:
        assert time.monotonic() < deadline, f"the pack purchase was not retried: {stored}"
        await asyncio.sleep(0.05)

    scraped = await scrape(listener.url + "/metrics")
    assert scraped.value("credits_listener_inbox_events", status="pending") == 1
    assert scraped.value("credits_listener_inbox_events", status="parked") == 1
    assert scraped.value("credits_listener_inbox_oldest_pending_age_seconds") > 0
    assert scraped.value("credits_listener_inbox_reachable") == 1
    processed = "credits_listener_events_processed_total"
    checkout = "checkout.session.completed"
    assert scraped.value(processed, event_type="customer.created", outcome="ignored") == 1
    assert scraped.value(processed, event_type=checkout, outcome="parked") == 1
    assert scraped.value(processed, event_type=checkout, outcome="retry") >= 1
    assert scraped.value(processed, event_type=checkout, outcome="done") == 0
    delivery = "credits_listener_event_delivery_seconds_count"
    assert (
        scraped.value(delivery, outcome="ignored"),
        scraped.value(delivery, outcome="parked"),
    ) == (
        1,
        1,
    )
    requests = "credits_listener_http_requests_total"
    assert scraped.value(requests, route="/stripe/webhook", status="200") == 3
    assert scraped.has("process_resident_memory_bytes")
