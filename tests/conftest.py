"""Shared fixtures: real SQLite and Postgres databases, real ledgers, a real gRPC server.

Every test works on its own accounts (the `accounts` fixture hands out a unique prefix) and
ends with a journal audit of them; the session ends with an audit of the whole database.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from pg_cluster import throwaway_cluster
from sqlalchemy.engine import make_url

from credits.v1 import credits_pb2_grpc
from server.app import CreditsApp
from server.config import ServerConfig
from store.audit import audit
from store.clock import Clock, ManualClock
from store.database import create_engine
from store.ledger import Ledger, LedgerSettings
from store.migrate import migrate

REQUIRE_SERVICES = os.environ.get("CREDITS_REQUIRE_SERVICES") == "1"
# 2027-01-15T08:00:00Z: a fixed start for tests that move time by hand.
MANUAL_CLOCK_START_US = 1_800_000_000_000_000

_skipped_postgres: list[str] = []


def _admin_url_to(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _create_database(admin_url: str) -> str:
    name = f"credits_test_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _admin_url_to(admin_url, name)


async def _drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _migrate_and_audit(url: str, check_audit: bool) -> None:
    engine = create_engine(url)
    try:
        if check_audit:
            report = await audit(engine)
            assert report.clean, "whole-database audit after the session:\n" + "\n".join(
                map(str, report.mismatches)
            )
        else:
            await migrate(engine)
    finally:
        await engine.dispose()


async def assert_audit_clean(database_url: str, account_prefix: str) -> None:
    engine = create_engine(database_url)
    try:
        report = await audit(engine, account_prefix)
    finally:
        await engine.dispose()
    assert report.clean, "\n".join(map(str, report.mismatches))


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str | None]:
    url = os.environ.get("CREDITS_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with throwaway_cluster() as cluster_url:
        yield cluster_url


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str | None) -> Iterator[str]:
    """A fresh, migrated Postgres database for this session, dropped at the end."""
    if postgres_admin_url is None:
        message = (
            "no PostgreSQL: set CREDITS_TEST_POSTGRES_URL or install PostgreSQL's server binaries"
        )
        if REQUIRE_SERVICES:
            pytest.fail(f"CREDITS_REQUIRE_SERVICES=1 but {message}", pytrace=False)
        pytest.skip(message)
    try:
        url = asyncio.run(_create_database(postgres_admin_url))
    except (OSError, asyncpg.PostgresError) as error:
        message = f"PostgreSQL at CREDITS_TEST_POSTGRES_URL is unreachable: {error}"
        if REQUIRE_SERVICES:
            pytest.fail(f"CREDITS_REQUIRE_SERVICES=1 but {message}", pytrace=False)
        pytest.skip(message)
    asyncio.run(_migrate_and_audit(url, check_audit=False))
    yield url
    asyncio.run(_migrate_and_audit(url, check_audit=True))
    asyncio.run(_drop_database(postgres_admin_url, url))


@pytest.fixture(scope="session")
def sqlite_url() -> Iterator[str]:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="credits-sqlite-"))
    url = f"sqlite:///{directory / 'credits.db'}"
    asyncio.run(_migrate_and_audit(url, check_audit=False))
    yield url
    asyncio.run(_migrate_and_audit(url, check_audit=True))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on Postgres."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def accounts() -> Callable[[str], str]:
    """accounts("alice") -> an account id no other test uses."""
    prefix = f"t{secrets.token_hex(5)}:"

    def make(name: str = "a") -> str:
        return prefix + name

    make.prefix = prefix  # type: ignore[attr-defined]
    return make


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(MANUAL_CLOCK_START_US)


@pytest.fixture
async def ledger(
    database_url: str, clock: ManualClock, accounts: Callable[[str], str]
) -> AsyncIterator[Ledger]:
    """A ledger on a manual clock; its accounts must audit clean when the test ends."""
    engine = create_engine(database_url)
    try:
        yield Ledger(engine, clock, LedgerSettings())
        report = await audit(engine, accounts.prefix)  # type: ignore[attr-defined]
        assert report.clean, "\n".join(map(str, report.mismatches))
    finally:
        await engine.dispose()


@dataclass
class RunningServer:
    app: CreditsApp
    address: str
    channel: grpc.aio.Channel
    stub: credits_pb2_grpc.CreditsServiceStub


@pytest.fixture
async def start_server(
    accounts: Callable[[str], str],
) -> AsyncIterator[Callable[..., object]]:
    """start_server(database_url, clock=None, **config) -> RunningServer on a free port."""
    running: list[RunningServer] = []

    async def start(
        database_url: str, clock: Clock | None = None, **overrides: object
    ) -> RunningServer:
        config = ServerConfig(
            listen="127.0.0.1:0",
            database_url=database_url,
            sweep_interval_seconds=float(overrides.pop("sweep_interval_seconds", 3600)),
            **overrides,  # type: ignore[arg-type]
        )
        app = CreditsApp(config, clock)
        port = await app.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(address)
        server = RunningServer(app, address, channel, credits_pb2_grpc.CreditsServiceStub(channel))
        running.append(server)
        return server

    yield start
    for server in running:
        await server.channel.close()
        await server.app.stop(grace_seconds=0)
        await assert_audit_clean(server.app.config.database_url, accounts.prefix)  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With CREDITS_REQUIRE_SERVICES=1 (CI), a Postgres test may not be deselected by marker."""
    if REQUIRE_SERVICES and not any(item.get_closest_marker("postgres") for item in items):
        raise pytest.UsageError("CREDITS_REQUIRE_SERVICES=1 but no Postgres test was collected")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    postgres_skips = [r for r in skipped if "postgres" in getattr(r, "keywords", {})]
    if postgres_skips:
        terminalreporter.write_sep(
            "!",
            f"{len(postgres_skips)} POSTGRES TESTS SKIPPED: no PostgreSQL was available. "
            "Set CREDITS_TEST_POSTGRES_URL to run them.",
            red=True,
            bold=True,
        )
