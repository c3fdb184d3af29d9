"""The Stripe listener, end to end: signed events from real Stripe object shapes, posted over
HTTP to a running listener, in front of a running credits server on Postgres; balances and the
journal read back over gRPC. Only Stripe's own API is faked, at the HTTP level (stripe_events).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
import stripe_events as se
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import _create_database, _drop_database, assert_audit_clean, run_sync
from processes import TEST_TOKEN, free_port, open_channel, spawn_server, wait_serving
from sqlalchemy.engine import Connection

from billing import config as billing_config
from billing import rules
from billing.app import ListenerApp
from billing.config import ConfigError, Overrides, WorkerSettings
from billing.database import create_engine
from billing.inbox import StoredEvent
from billing.migrate import VERSION_TABLE, current_revision, head_revision, migrate
from billing.records import Records
from billing.schema import metadata as billing_metadata
from billing.worker import backoff_seconds
from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "whsec_test_current"
SECRET_OLD = "whsec_test_previous"
API_KEY = "sk_test_listener"
DAY_S = 86_400

PACK = "price_pack_500"  # 500 default credits a unit
PACK_AI = "price_pack_ai_100"  # 100 "ai" credits a unit
PRO = "price_pro_monthly"  # 10,000 a period, 3 days' grace
TEAM = "price_team_monthly"  # 50,000 a period, 3 days' grace
SHORT = "price_short_plan"  # 300 a period, 2 s grace: for watching credits expire

PACKS_TOML = f"""
[[packs]]
price = "{PACK}"
credits_per_unit = 500

[[packs]]
price = "{PACK_AI}"
credits_per_unit = 100
credit_type = "ai"
"""
PACK_ONLY_TOML = PACKS_TOML.split(f'price = "{PACK_AI}"')[0].rsplit("[[packs]]", 1)[0]
PLANS_TOML = f"""
[[plans]]
price = "{PRO}"
credits_per_period = 10000
expiry_grace_seconds = 259200

[[plans]]
price = "{TEAM}"
credits_per_period = 50000
expiry_grace_seconds = 259200

[[plans]]
price = "{SHORT}"
credits_per_period = 300
expiry_grace_seconds = 2
"""


def config_toml(
    stripe_api_base: str, *, livemode: bool = False, packs: str = PACKS_TOML, attempts_max: int = 40
) -> str:
    # Small backoff so an outage of a few seconds drains in a few seconds.
    return f"""
[listener]
livemode = {str(livemode).lower()}
stripe_api_base = "{stripe_api_base}"

[checkout]
success_url = "https://app.example.com/credits/thanks"
cancel_url = "https://app.example.com/credits"

[worker]
attempts_max = {attempts_max}
backoff_initial_seconds = 0.05
backoff_max_seconds = 0.4
poll_interval_seconds = 0.05
{packs}
{PLANS_TOML}
"""


# ---- harness -----------------------------------------------------------------------------------


@dataclass
class Listener:
    app: ListenerApp
    url: str
    http: aiohttp.ClientSession
    config_path: pathlib.Path

    @property
    def database_url(self) -> str:
        return self.app.config.database_url

    async def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(self.url + path, data=body, headers=headers or {}) as response:
            return response.status, await response.json()

    async def deliver(
        self, event: se.Json, *, secret: str = SECRET, timestamp: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        body = json.dumps(event).encode()
        return await self.post(
            "/stripe/webhook",
            body,
            {
                "Stripe-Signature": se.signature_header(body, secret, timestamp),
                "Content-Type": "application/json",
            },
        )

    async def settled(self, *event_ids: str, timeout_seconds: float = 20.0) -> list[StoredEvent]:
        """Waits until the worker is done with every event (done, ignored or parked)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            stored = [await self.app.inbox.get(event_id) for event_id in event_ids]
            if all(e is not None and e.status != "pending" for e in stored):
                return [e for e in stored if e is not None]
            assert time.monotonic() < deadline, f"events still pending: {stored}"
            await asyncio.sleep(0.02)


StartListener = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def fake_stripe() -> AsyncIterator[se.FakeStripe]:
    fake = se.FakeStripe(api_key=API_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_listener(
    tmp_path: pathlib.Path, fake_stripe: se.FakeStripe
) -> AsyncIterator[StartListener]:
    """start_listener(credits_address, ...) -> a listener serving on a free port, with its own
    SQLite inbox in tmp_path unless given a database_url."""
    running: list[Listener] = []

    async def start(
        credits_address: str,
        *,
        name: str = "listener",
        livemode: bool = False,
        toml: str | None = None,
        database_url: str | None = None,
        api_key: str | None = API_KEY,
    ) -> Listener:
        path = tmp_path / f"{name}.toml"
        path.write_text(toml or config_toml(fake_stripe.url, livemode=livemode))
        environ = {
            billing_config.ENV_SIGNING_SECRETS: f"{SECRET}, {SECRET_OLD}",
            billing_config.ENV_CREDITS_TOKEN: TEST_TOKEN,
        }
        if api_key:
            environ[billing_config.ENV_API_KEY] = api_key
        config = billing_config.load(
            path,
            environ,
            Overrides(
                listen="127.0.0.1:0",
                credits_address=credits_address,
                database_url=database_url or f"sqlite:///{tmp_path / name}.db",
            ),
        )
        app = ListenerApp(config, migrate_on_start=True)
        port = await app.start()
        listener = Listener(app, f"http://127.0.0.1:{port}", aiohttp.ClientSession(), path)
        running.append(listener)
        return listener

    yield start
    for listener in running:
        await listener.http.close()
        await listener.app.stop()


async def stop_listener(listener: Listener) -> None:
    await listener.http.close()
    await listener.app.stop()


async def balance(stub: credits_pb2_grpc.CreditsServiceStub, account: str, ct: str = "") -> int:
    response = await stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, credit_type=ct, consistent=True)
    )
    return int(response.balance)


async def journal(
    stub: credits_pb2_grpc.CreditsServiceStub, account: str, kind: int | None = None
) -> list[pb.JournalEntry]:
    """The account's journal, oldest first."""
    response = await stub.History(
        pb.HistoryRequest(account_id=account, page_size=500, kinds=[kind] if kind else [])
    )
    return list(reversed(response.entries))


async def has_balance(
    stub: credits_pb2_grpc.CreditsServiceStub, account: str, expected: int, ct: str = ""
) -> bool:
    return await balance(stub, account, ct) == expected


async def eventually(check: Callable[[], Awaitable[bool]], timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"still not true after {timeout_seconds} s"
        await asyncio.sleep(0.05)


def grants_of(entries: list[pb.JournalEntry]) -> list[tuple[str, int]]:
    return [(e.idempotency_key, e.amount) for e in entries if e.kind == pb.ENTRY_KIND_GRANT]


async def buy(
    listener: Listener,
    fake: se.FakeStripe,
    account: str,
    items: list[tuple[str, int]],
    *,
    payment_intent: str | None = None,
) -> tuple[str, str]:
    """A paid pack purchase delivered and processed; returns (session id, event id)."""
    session_id = se.new_id("cs")
    fake.register(session_id, items)
    completed = se.event(
        "checkout.session.completed",
        se.checkout_session(session_id, account, payment_intent=payment_intent),
    )
    status, _ = await listener.deliver(completed)
    assert status == 200
    (stored,) = await listener.settled(completed["id"])
    assert stored.status == "done", stored
    return session_id, completed["id"]


# ---- configuration and rules -------------------------------------------------------------------


def test_example_config_loads_with_secrets_from_the_environment() -> None:
    config = billing_config.load(
        ROOT / "billing.example.toml",
        {billing_config.ENV_SIGNING_SECRETS: "whsec_a,whsec_b", "STRIPE_API_KEY": "sk_test_x"},
    )
    assert config.signing_secrets == ("whsec_a", "whsec_b")
    assert (config.listen, config.credits_address) == ("127.0.0.1:8080", "127.0.0.1:50051")
    assert config.database_url == "sqlite:///var/listener.db"
    assert config.packs["price_credits_500"].credits_per_unit == 500
    assert config.plans["price_pro_monthly"].expiry_grace_seconds == 3 * DAY_S
    assert not config.livemode and config.disputes.unlock_on == {"won", "warning_closed"}


def test_config_refuses_secrets_in_the_file_and_reports_every_problem(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[listener]
livemode = true
webhook_secret = "whsec_oops"

[[packs]]
price = "price_a"
credits_per_unit = 0

[[packs]]
price = "price_a"
credits_per_unit = 10

[[plans]]
price = "price_b"
credits_per_period = 10
rollover_cap = 5
"""
    )
    with pytest.raises(ConfigError) as refused:
        billing_config.load(path, {"STRIPE_API_KEY": "sk_test_x"})
    message = str(refused.value)
    assert "secrets never go in the file" in message
    assert "credits_per_unit: must be an integer 1.." in message
    assert "'price_a' is configured twice" in message
    assert "rollover is not implemented" in message
    assert "test-mode key but [listener] livemode is true" in message


def test_upgrade_tops_up_the_prorated_difference_and_a_downgrade_grants_nothing() -> None:
    start, end = 1_000_000, 1_000_000 + 30 * DAY_S
    # Pro (10,000) to Team (50,000) with 20 of 30 days left: two thirds of the difference.
    assert rules.upgrade_top_up(50_000, 10_000, start, end, end - 20 * DAY_S) == 26_666
    assert rules.upgrade_top_up(50_000, 10_000, start, end, start) == 40_000
    assert rules.upgrade_top_up(50_000, 10_000, start, end, end) == 0
    assert rules.upgrade_top_up(10_000, 50_000, start, end, start) == 0
    assert rules.upgrade_top_up(10_000, 10_000, start, end, start) == 0


def test_refund_share_rounds_down_and_never_exceeds_the_grant() -> None:
    assert rules.refund_target(1000, 2000, 1000) == 500
    assert rules.refund_target(1000, 3000, 1000) == 333
    assert rules.refund_target(1000, 2000, 5000) == 1000
    assert rules.refund_target(1000, 0, 0) == 0


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    settings = WorkerSettings(backoff_initial_seconds=2, backoff_max_seconds=60)
    delays = [backoff_seconds(attempt, settings) for attempt in range(1, 8)]
    assert delays == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_seconds(10_000, settings) == 60


def _listener_schema_drift(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    return list(compare_metadata(context, billing_metadata))


async def _assert_migrations_match_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate(engine)
        await migrate(engine)  # a second run finds nothing to do
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            drift = await conn.run_sync(_listener_schema_drift)
        assert drift == [], f"billing migrations and billing/schema.py differ: {drift}"
    finally:
        await engine.dispose()


@pytest.fixture
def listener_postgres_url(postgres_url: str, postgres_admin_url: str | None) -> Iterator[str]:
    """A Postgres database of the listener's own (the ledger's session database must keep
    exactly the ledger's schema: test_build checks it)."""
    assert postgres_admin_url is not None, "postgres_url would have skipped"
    url = run_sync(_create_database(postgres_admin_url, prefix="billing_test"))
    yield url
    run_sync(_drop_database(postgres_admin_url, url))


async def test_listener_migrations_build_exactly_the_declared_schema_on_sqlite(
    tmp_path: pathlib.Path,
) -> None:
    await _assert_migrations_match_schema(f"sqlite:///{tmp_path / 'listener.db'}")


@pytest.mark.postgres
async def test_listener_migrations_build_exactly_the_declared_schema_on_postgres(
    listener_postgres_url: str,
) -> None:
    await _assert_migrations_match_schema(listener_postgres_url)


# ---- the webhook refuses what is not a fresh, signed Stripe event -------------------------------


@pytest.mark.postgres
async def test_tampered_body_wrong_secret_or_stale_signature_is_refused_and_changes_nothing(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    account = accounts("tamper")
    session_id = se.new_id("cs")
    fake_stripe.register(session_id, [(PACK, 1)])
    event = se.event("checkout.session.completed", se.checkout_session(session_id, account))
    body = json.dumps(event).encode()
    good_header = se.signature_header(body, SECRET)

    tampered = body.replace(account.encode(), accounts("thief").encode())
    refusals = [
        (tampered, good_header, "matches the body"),
        (body, se.signature_header(body, "whsec_someone_else"), "matches the body"),
        (body, se.signature_header(body, SECRET, int(time.time()) - 301), "more than 300 s old"),
        (body, "t=abc,v9=zz", "malformed"),
        (body, "", "no Stripe-Signature header"),
    ]
    for payload, header, reason in refusals:
        status, answer = await listener.post(
            "/stripe/webhook", payload, {"Stripe-Signature": header} if header else {}
        )
        assert status == 400, (reason, answer)
        assert reason in answer["error"]
    assert await listener.app.inbox.counts() == {"pending": 0, "done": 0, "ignored": 0, "parked": 0}
    assert await balance(server.stub, account) == 0
    assert await balance(server.stub, accounts("thief")) == 0

    # The same bytes, signed by the secret being rotated out, are accepted and grant.
    status, answer = await listener.post(
        "/stripe/webhook", body, {"Stripe-Signature": se.signature_header(body, SECRET_OLD)}
    )
    assert (status, answer["duplicate"]) == (200, False)
    await listener.settled(event["id"])
    assert await balance(server.stub, account) == 500


@pytest.mark.postgres
async def test_oversized_or_unparseable_bodies_are_refused_and_nothing_is_recorded(
    start_server: Callable[..., Any], start_listener: StartListener, postgres_url: str
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    oversized = b"{" + b" " * (256 * 1024) + b"}"
    status, answer = await listener.post(
        "/stripe/webhook", oversized, {"Stripe-Signature": se.signature_header(oversized, SECRET)}
    )
    assert status == 413 and "at most 262144" in answer["error"]
    for payload, reason in [
        (b"not json at all", "not JSON"),
        (b'{"object": "charge", "id": "ch_1"}', "event.object must be 'event'"),
        (json.dumps({**se.event("charge.refunded", {}), "id": "x"}).encode(), "evt_"),
        (b"\xff\xfe", "not UTF-8"),
    ]:
        header = se.signature_header(payload, SECRET) if reason != "not UTF-8" else "t=1,v1=00"
        status, answer = await listener.post(
            "/stripe/webhook", payload, {"Stripe-Signature": header}
        )
        assert status == 400, (reason, answer)
        assert reason in answer["error"]
    assert await listener.app.inbox.counts() == {"pending": 0, "done": 0, "ignored": 0, "parked": 0}


@pytest.mark.postgres
async def test_test_mode_event_is_refused_by_a_live_listener_and_the_reverse(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    live = await start_listener(server.address, name="live", livemode=True, api_key=None)
    test = await start_listener(server.address, name="test")
    session = se.checkout_session(se.new_id("cs"), accounts("mode"))
    status, answer = await live.deliver(se.event("checkout.session.completed", session))
    assert status == 400 and "test-mode event" in answer["error"]
    status, answer = await test.deliver(
        se.event("checkout.session.completed", session, livemode=True)
    )
    assert status == 400 and "live-mode event" in answer["error"]
    for listener in (live, test):
        assert (await listener.app.inbox.counts())["pending"] == 0
    assert await balance(server.stub, accounts("mode")) == 0


# ---- packs -------------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_pack_purchase_grants_once_when_delivered_five_times_concurrently(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    listener_postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    # This listener's inbox is on Postgres: five concurrent inserts of one event id.
    listener = await start_listener(server.address, database_url=listener_postgres_url)
    account = accounts("buyer")
    session_id = se.new_id("cs")
    # Three lines, two credit types, paged by the fake API two at a time.
    fake_stripe.register(session_id, [(PACK, 2), ("price_not_ours", 1), (PACK_AI, 3)])
    event = se.event("checkout.session.completed", se.checkout_session(session_id, account))

    answers = await asyncio.gather(*(listener.deliver(event) for _ in range(5)))
    assert [status for status, _ in answers] == [200] * 5
    assert sorted(answer["duplicate"] for _, answer in answers) == [False, True, True, True, True]
    (stored,) = await listener.settled(event["id"])
    assert stored.status == "done" and stored.attempts == 1, stored
    # And five more, one after the other, after processing.
    for _ in range(5):
        assert (await listener.deliver(event))[1]["duplicate"] is True
    await asyncio.sleep(0.2)

    assert await balance(server.stub, account) == 1000
    assert await balance(server.stub, account, "ai") == 300
    assert sorted(grants_of(await journal(server.stub, account))) == [
        (f"stripe:{session_id}:ai", 300),
        (f"stripe:{session_id}:default", 1000),
    ]
    entries = await journal(server.stub, account, pb.ENTRY_KIND_GRANT)
    assert {e.request_id for e in entries} == {event["id"]}
    assert {e.action for e in entries} == {"stripe.checkout"}


@pytest.mark.postgres
async def test_async_payment_succeeded_after_completed_for_one_session_grants_once(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    account = accounts("bank-transfer")
    session_id = se.new_id("cs")
    fake_stripe.register(session_id, [(PACK, 1)])

    pending = se.event(
        "checkout.session.completed",
        se.checkout_session(session_id, account, payment_status="unpaid"),
    )
    await listener.deliver(pending)
    (stored,) = await listener.settled(pending["id"])
    assert "async_payment_succeeded" in stored.outcome
    assert await balance(server.stub, account) == 0

    paid = se.checkout_session(session_id, account, payment_status="paid")
    succeeded = se.event("checkout.session.async_payment_succeeded", paid)
    # A completed event for the same session, paid, with an id of its own (as if re-sent).
    completed = se.event("checkout.session.completed", paid)
    for event in (succeeded, completed, succeeded):
        assert (await listener.deliver(event))[0] == 200
    await listener.settled(succeeded["id"], completed["id"])

    assert await balance(server.stub, account) == 500
    assert grants_of(await journal(server.stub, account)) == [(f"stripe:{session_id}:default", 500)]


@pytest.mark.postgres
async def test_two_listeners_with_separate_inboxes_still_grant_once(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    """The idempotency keys come from Stripe ids alone, so the ledger deduplicates even when
    nothing on the listener's side knows the event was already processed."""
    server = await start_server(postgres_url)
    first = await start_listener(server.address, name="first")
    second = await start_listener(server.address, name="second")
    account = accounts("twice")
    session_id = se.new_id("cs")
    fake_stripe.register(session_id, [(PACK, 3)])
    session = se.checkout_session(session_id, account)
    completed = se.event("checkout.session.completed", session)
    succeeded = se.event("checkout.session.async_payment_succeeded", session)
    await asyncio.gather(
        first.deliver(completed), second.deliver(succeeded), second.deliver(completed)
    )
    await first.settled(completed["id"])
    await second.settled(completed["id"], succeeded["id"])
    assert await balance(server.stub, account) == 1500
    assert grants_of(await journal(server.stub, account)) == [
        (f"stripe:{session_id}:default", 1500)
    ]


@pytest.mark.postgres
async def test_purchase_flow_creates_a_checkout_session_whose_payment_grants_the_pack(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    account = accounts("shopper")
    request = {"account_id": account, "price_id": PACK_AI, "quantity": 4}
    status, started = await listener.post("/purchases", json.dumps(request).encode())
    assert status == 201, started
    assert started["url"].startswith("https://checkout.stripe.com/")
    (form,) = fake_stripe.created
    assert form["mode"] == "payment"
    assert form["client_reference_id"] == account
    assert (form["line_items[0][price]"], form["line_items[0][quantity]"]) == (PACK_AI, "4")
    assert form["metadata[account_id]"] == account
    assert form["success_url"] == "https://app.example.com/credits/thanks"

    for bad, reason in [
        ({**request, "account_id": "no spaces allowed"}, "account_id"),
        ({**request, "price_id": "price_unknown"}, "not a configured pack"),
        ({**request, "quantity": 0}, "quantity"),
    ]:
        status, answer = await listener.post("/purchases", json.dumps(bad).encode())
        assert status == 400 and reason in answer["error"], answer
    assert len(fake_stripe.created) == 1

    # The buyer pays; Stripe says so.
    session = se.checkout_session(started["session_id"], account)
    await listener.deliver(se.event("checkout.session.completed", session))
    await eventually(lambda: has_balance(server.stub, account, 400, "ai"))


# ---- subscriptions -----------------------------------------------------------------------------


@pytest.mark.postgres
async def test_invoice_renewal_grants_the_period_credits_expiring_at_period_end_plus_grace(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url, sweep_interval_seconds=0.1)
    listener = await start_listener(server.address)
    account = accounts("subscriber")
    subscription_id, invoice_id = se.new_id("sub"), se.new_id("in")
    period_end_s = int(time.time()) + 2
    line = se.invoice_line(SHORT, period_end_s - 30 * DAY_S, period_end_s)
    invoice = se.invoice(invoice_id, subscription_id, [line], account_id=account)
    first, again = se.event("invoice.paid", invoice), se.event("invoice.paid", invoice)
    for event in (first, again, first):
        assert (await listener.deliver(event))[0] == 200
    await listener.settled(first["id"], again["id"])
    assert await balance(server.stub, account) == 300
    assert grants_of(await journal(server.stub, account)) == [(f"stripe:{invoice_id}:default", 300)]

    # Past the period's end, the 2 s of grace keep the credits...
    await asyncio.sleep(max(0.0, period_end_s + 0.5 - time.time()))
    assert await balance(server.stub, account) == 300
    # ...and then they expire, not before period end + grace: the balance counts live grants
    # only, and the sweeper journals the expiry.
    await eventually(lambda: has_balance(server.stub, account, 0))
    assert time.time() >= period_end_s + 2

    async def expiry_journaled() -> bool:
        return bool(await journal(server.stub, account, pb.ENTRY_KIND_GRANT_EXPIRY))

    await eventually(expiry_journaled)
    (expiry,) = await journal(server.stub, account, pb.ENTRY_KIND_GRANT_EXPIRY)
    assert expiry.amount == -300
    assert expiry.created_at.ToMicroseconds() >= (period_end_s + 2) * 1_000_000


@pytest.mark.postgres
async def test_upgrade_mid_period_grants_the_prorated_difference_downgrade_waits_deletion_stops(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    account = accounts("growing")
    subscription_id = se.new_id("sub")
    now_s = int(time.time())
    start_s, end_s = now_s - 10 * DAY_S, now_s + 20 * DAY_S

    async def paid(invoice_id: str, lines: list[se.Json], reason: str) -> StoredEvent:
        invoice = se.invoice(
            invoice_id, subscription_id, lines, account_id=account, billing_reason=reason
        )
        event = se.event("invoice.paid", invoice)
        assert (await listener.deliver(event))[0] == 200
        (stored,) = await listener.settled(event["id"])
        assert stored.status == "done", stored
        return stored

    created = se.new_id("in")
    await paid(created, [se.invoice_line(PRO, start_s, end_s)], "subscription_create")
    assert await balance(server.stub, account) == 10_000

    # Pro -> Team with 20 of the period's 30 days left.
    upgrade = se.new_id("in")
    await paid(
        upgrade,
        [
            se.invoice_line(PRO, now_s, end_s, amount=-1333, proration=True),
            se.invoice_line(TEAM, now_s, end_s, amount=6666, proration=True),
        ],
        "subscription_update",
    )
    assert await balance(server.stub, account) == 10_000 + 26_666

    # Team -> Pro the same day: nothing now; the next period is Pro's.
    downgrade = await paid(
        se.new_id("in"),
        [
            se.invoice_line(TEAM, now_s + 60, end_s, amount=-6666, proration=True),
            se.invoice_line(PRO, now_s + 60, end_s, amount=1333, proration=True),
        ],
        "subscription_update",
    )
    assert "lower level applies next period" in downgrade.outcome
    renewal = se.new_id("in")
    await paid(renewal, [se.invoice_line(PRO, end_s, end_s + 30 * DAY_S)], "subscription_cycle")
    assert await balance(server.stub, account) == 10_000 + 26_666 + 10_000

    # Deleted: the period after it ends brings nothing; what was granted stays.
    deleted = se.event(
        "customer.subscription.deleted", se.subscription(subscription_id, end_s + 30 * DAY_S)
    )
    await listener.deliver(deleted)
    await listener.settled(deleted["id"])
    late = await paid(
        se.new_id("in"),
        [se.invoice_line(PRO, end_s + 30 * DAY_S, end_s + 60 * DAY_S)],
        "subscription_cycle",
    )
    assert "ended" in late.outcome
    assert await balance(server.stub, account) == 46_666
    assert grants_of(await journal(server.stub, account)) == [
        (f"stripe:{created}:default", 10_000),
        (f"stripe:{upgrade}:default:upgrade", 26_666),
        (f"stripe:{renewal}:default", 10_000),
    ]


# ---- refunds and disputes ----------------------------------------------------------------------


@pytest.mark.postgres
async def test_refund_claws_back_the_refunded_share_never_below_zero(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    account = accounts("refunded")
    payment_intent, charge_id = se.new_id("pi"), se.new_id("ch")
    await buy(listener, fake_stripe, account, [(PACK, 2)], payment_intent=payment_intent)
    # 300 of the 1000 credits are spent.
    reserved = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=300, idempotency_key="work-1")
    )
    await server.stub.Commit(
        pb.CommitRequest(account_id=account, reservation_id=reserved.reservation.reservation_id)
    )

    half = se.event("charge.refunded", se.charge(charge_id, payment_intent, 2000, 1000))
    for event in (half, half, se.event("charge.refunded", half["data"]["object"])):
        assert (await listener.deliver(event))[0] == 200
    await asyncio.sleep(0.3)
    await listener.settled(half["id"])
    assert await balance(server.stub, account) == 700 - 500

    full = se.event("charge.refunded", se.charge(charge_id, payment_intent, 2000, 2000))
    await listener.deliver(full)
    (stored,) = await listener.settled(full["id"])
    assert "300 short" in stored.outcome
    # The half refund arriving again, late, takes nothing more.
    late_half = se.event("charge.refunded", half["data"]["object"])
    await listener.deliver(late_half)
    await listener.settled(late_half["id"])

    assert await balance(server.stub, account) == 0
    clawbacks = await journal(server.stub, account, pb.ENTRY_KIND_CLAWBACK)
    assert [e.amount for e in clawbacks] == [-500, -200]
    assert [e.idempotency_key for e in clawbacks] == [
        f"stripe:refund:{charge_id}:1000:purchase:default",
        f"stripe:refund:{charge_id}:2000:purchase:default",
    ]
    records = Records(listener.app.engine)
    (grant,) = await records.grants_for_payment(payment_intent)
    recorded = await records.clawbacks_of(grant.idempotency_key)
    assert [(c.amount_requested, c.amount_clawed_back, c.shortfall) for c in recorded] == [
        (500, 500, 0),
        (500, 200, 300),
    ]


async def _status(stub: credits_pb2_grpc.CreditsServiceStub, account: str) -> int:
    response = await stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, consistent=True))
    return int(response.account_status)


@pytest.mark.postgres
async def test_dispute_locks_the_account_and_a_won_close_unlocks_it(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)

    async def dispute(account: str, payment_intent: str, dispute_id: str, status: str) -> None:
        kind = "charge.dispute.created" if status == "needs_response" else "charge.dispute.closed"
        obj = se.dispute(dispute_id, se.new_id("ch"), payment_intent, status)
        event = se.event(kind, obj)
        assert (await listener.deliver(event))[0] == 200
        (stored,) = await listener.settled(event["id"])
        assert stored.status == "done", stored

    won, lost, reordered = accounts("won"), accounts("lost"), accounts("reordered")
    intents = {account: se.new_id("pi") for account in (won, lost, reordered)}
    for account, payment_intent in intents.items():
        await buy(listener, fake_stripe, account, [(PACK, 1)], payment_intent=payment_intent)

    await dispute(won, intents[won], "dp_won", "needs_response")
    assert await _status(server.stub, won) == pb.ACCOUNT_STATUS_LOCKED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.Reserve(pb.ReserveRequest(account_id=won, amount=1, idempotency_key="k"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await dispute(won, intents[won], "dp_won", "won")
    assert await _status(server.stub, won) == pb.ACCOUNT_STATUS_ACTIVE

    await dispute(lost, intents[lost], "dp_lost", "needs_response")
    await dispute(lost, intents[lost], "dp_lost", "lost")
    assert await _status(server.stub, lost) == pb.ACCOUNT_STATUS_LOCKED

    # Closed (won) delivered before created: the account is never left locked.
    await dispute(reordered, intents[reordered], "dp_reordered", "won")
    await dispute(reordered, intents[reordered], "dp_reordered", "needs_response")
    assert await _status(server.stub, reordered) == pb.ACCOUNT_STATUS_ACTIVE


# ---- everything else; parking and replay; outage -----------------------------------------------


@pytest.mark.postgres
async def test_other_event_types_are_acknowledged_ignored_and_counted(
    start_server: Callable[..., Any], start_listener: StartListener, postgres_url: str
) -> None:
    server = await start_server(postgres_url)
    listener = await start_listener(server.address)
    plan_created = se.fixture("event")  # event.json as Stripe publishes it: a plan.created
    plan_created["id"] = se.new_id("evt")
    plan_created["created"] = int(time.time())
    others = [plan_created, se.event("customer.created", se.fixture("customer"))]
    for event in others:
        status, answer = await listener.deliver(event)
        assert (status, answer["received"]) == (200, True)
    stored = await listener.settled(*(event["id"] for event in others))
    assert {e.status for e in stored} == {"ignored"}
    assert await listener.app.inbox.ignored_by_type() == {"customer.created": 1, "plan.created": 1}
    async with listener.http.get(listener.url + "/healthz") as response:
        health = await response.json()
    assert (response.status, health["status"], health["ignored"]) == (200, "ok", 2)


def _cli(listener: Listener, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "CREDITS_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "billing.main",
            *args,
            "--config",
            str(listener.config_path),
            "--database-url",
            listener.database_url,
        ],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.postgres
async def test_parked_event_is_listed_and_granted_once_replayed_after_the_config_is_fixed(
    start_server: Callable[..., Any],
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    server = await start_server(postgres_url)
    # A config that does not know the AI pack yet.
    first = await start_listener(
        server.address, toml=config_toml(fake_stripe.url, packs=PACK_ONLY_TOML)
    )
    account = accounts("parked")
    session_id = se.new_id("cs")
    fake_stripe.register(session_id, [(PACK_AI, 2)])
    event = se.event("checkout.session.completed", se.checkout_session(session_id, account))
    await first.deliver(event)
    (stored,) = await first.settled(event["id"])
    assert stored.status == "parked" and stored.attempts == 1
    assert f"no line with a configured pack price (its prices: {PACK_AI})" in stored.last_error

    listed = await asyncio.to_thread(_cli, first, "parked")
    assert listed.returncode == 0, listed.stderr
    assert event["id"] in listed.stdout and "configured pack price" in listed.stdout

    # Ops add the price and restart the listener, then replay.
    await stop_listener(first)
    fixed = await start_listener(server.address, name="fixed", database_url=first.database_url)
    replayed = await asyncio.to_thread(_cli, fixed, "replay", event["id"])
    assert replayed.returncode == 0, replayed.stderr
    (stored,) = await fixed.settled(event["id"])
    assert stored.status == "done", stored
    assert await balance(server.stub, account, "ai") == 200
    again = await asyncio.to_thread(_cli, fixed, "replay", event["id"])
    assert again.returncode == 1 and "not parked" in again.stderr
    assert "no parked events" in (await asyncio.to_thread(_cli, fixed, "parked")).stdout


async def test_event_failing_every_attempt_is_parked_with_its_last_error(
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    accounts: Callable[[str], str],
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # no credits server there
    listener = await start_listener(dead, toml=config_toml(fake_stripe.url, attempts_max=3))
    session_id = se.new_id("cs")
    fake_stripe.register(session_id, [(PACK, 1)])
    event = se.event("checkout.session.completed", se.checkout_session(session_id, accounts()))
    await listener.deliver(event)
    (stored,) = await listener.settled(event["id"])
    assert (stored.status, stored.attempts) == ("parked", 3)
    assert stored.last_error.startswith("gave up after 3 attempts: AddCredits 500 default")
    assert "UNAVAILABLE" in stored.last_error


@pytest.mark.postgres
@pytest.mark.slow
async def test_credits_server_outage_delays_credits_but_every_one_arrives_once(
    start_listener: StartListener,
    fake_stripe: se.FakeStripe,
    postgres_url: str,
    accounts: Callable[[str], str],
) -> None:
    port = free_port()
    server = spawn_server(postgres_url, port=port)
    restarted = None
    try:
        await wait_serving(server.address, server.process)
        listener = await start_listener(server.address)
        buyers = [accounts(f"buyer{i}") for i in range(3)]
        subscriber = accounts("subscriber")

        server.process.kill()  # SIGKILL: no goodbye
        server.process.wait(10)

        deliveries: list[se.Json] = []
        for index, account in enumerate(buyers):
            session_id = se.new_id("cs")
            fake_stripe.register(session_id, [(PACK, index + 1)])
            deliveries.append(
                se.event("checkout.session.completed", se.checkout_session(session_id, account))
            )
        now_s = int(time.time())
        invoice_id = se.new_id("in")
        line = se.invoice_line(PRO, now_s - DAY_S, now_s + 29 * DAY_S)
        deliveries.append(
            se.event(
                "invoice.paid",
                se.invoice(invoice_id, se.new_id("sub"), [line], account_id=subscriber),
            )
        )
        for event in deliveries + deliveries:  # each delivered twice
            status, _ = await listener.deliver(event)
            assert status == 200
        await asyncio.sleep(0.5)
        for event in deliveries:
            stored = await listener.app.inbox.get(event["id"])
            assert stored is not None and stored.status == "pending", stored
            assert stored.attempts >= 1 and "UNAVAILABLE" in stored.last_error, stored

        restarted = spawn_server(postgres_url, port=port)
        await wait_serving(restarted.address, restarted.process)
        stored_events = await listener.settled(*(event["id"] for event in deliveries))
        assert {e.status for e in stored_events} == {"done"}

        async with open_channel(restarted.address) as channel:
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            for index, account in enumerate(buyers):
                assert await balance(stub, account) == 500 * (index + 1)
                assert len(grants_of(await journal(stub, account))) == 1
            assert await balance(stub, subscriber) == 10_000
            assert grants_of(await journal(stub, subscriber)) == [
                (f"stripe:{invoice_id}:default", 10_000)
            ]
    finally:
        for process in (server, restarted):
            if process is not None and process.process.poll() is None:
                process.terminate()
    await assert_audit_clean(postgres_url, accounts.prefix)  # type: ignore[attr-defined]


async def test_credits_listener_process_serves_with_the_example_config_and_stops_on_sigterm(
    tmp_path: pathlib.Path,
) -> None:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "CREDITS_"))}
    environ[billing_config.ENV_SIGNING_SECRETS] = SECRET
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing.main",
            "serve",
            "--config",
            str(ROOT / "billing.example.toml"),
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            f"sqlite:///{tmp_path / 'listener.db'}",
            "--migrate",
        ],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"

            async def healthy() -> bool:
                assert process.poll() is None, "the listener exited"
                try:
                    async with http.get(url + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(healthy, timeout_seconds=20)
            event = se.event("customer.created", se.fixture("customer"))
            body = json.dumps(event).encode()
            headers = {"Stripe-Signature": se.signature_header(body, SECRET)}
            async with http.post(url + "/stripe/webhook", data=body, headers=headers) as response:
                assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 15)
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert returncode == 0, stderr[-2000:]
    assert '"msg": "listening"' in stderr
