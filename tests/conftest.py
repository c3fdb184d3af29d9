"""Shared fixtures: real SQLite and Postgres databases, real ledgers, a real gRPC server.

Every test works on its own accounts (the `accounts` fixture hands out a unique prefix) and
ends with a journal audit of them; the session ends with an audit of the whole database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

# gRPC's C core as credits-server runs it (src/server/grpc_core.py), set before grpc loads, so
# that the in-process servers of the suite run it too.
from server import grpc_core as _grpc_core  # noqa: F401  # isort: skip
import asyncpg
import grpc
import pytest
import redis as redis_sync
import redis.asyncio as redis_asyncio
from pg_cluster import throwaway_cluster
from processes import TEST_CALLER, TEST_TOKEN, free_port, open_channel
from redis import exceptions as redis_exceptions
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from credits.v1 import credits_pb2_grpc
from server.app import CreditsApp
from server.config import ServerConfig
from store.audit import audit
from store.callers import ALL_SCOPES, CallerStore
from store.clock import Clock, ManualClock
from store.database import create_engine
from store.ledger import Ledger, LedgerSettings
from store.migrate import migrate
from store.tx import Transactor

T = TypeVar("T")
REQUIRE_SERVICES = os.environ.get("CREDITS_REQUIRE_SERVICES") == "1"
# 2027-01-15T08:00:00Z: a fixed start for tests that move time by hand.
MANUAL_CLOCK_START_US = 1_800_000_000_000_000

_skipped_postgres: list[str] = []


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion on a fresh loop in another thread: session fixtures may be
    first requested from inside a test's running event loop, where asyncio.run is refused."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _admin_url_to(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy Postgres URL (postgresql+asyncpg://...) in the form asyncpg.connect takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _create_database(admin_url: str, prefix: str = "credits_test") -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _admin_url_to(admin_url, name)


async def _drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def create_migrated_database(admin_url: str) -> str:
    """A new database with the ledger's schema, for a test whose tables (or their counters)
    must hold only what it put there. Drop it with _drop_database."""
    url = await _create_database(admin_url)
    engine = create_engine(url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    return url


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
            await _add_test_caller(engine)
    finally:
        await engine.dispose()


async def _add_test_caller(engine: AsyncEngine) -> None:
    """The suite's caller (processes.TEST_CALLER), holding this session's token."""
    store = CallerStore(Transactor(engine))
    if await store.get(TEST_CALLER) is None:
        await store.add(TEST_CALLER, ALL_SCOPES, (), "tests")
    await store.add_token(TEST_CALLER, TEST_TOKEN, "test session", "tests")


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
        url = run_sync(_create_database(postgres_admin_url))
    except (OSError, asyncpg.PostgresError) as error:
        message = f"PostgreSQL at CREDITS_TEST_POSTGRES_URL is unreachable: {error}"
        if REQUIRE_SERVICES:
            pytest.fail(f"CREDITS_REQUIRE_SERVICES=1 but {message}", pytrace=False)
        pytest.skip(message)
    run_sync(_migrate_and_audit(url, check_audit=False))
    yield url
    run_sync(_migrate_and_audit(url, check_audit=True))
    run_sync(_drop_database(postgres_admin_url, url))


DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis (CREDITS_TEST_REDIS_URL, default the local one), or skip / fail."""
    url = os.environ.get("CREDITS_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    # Synchronous client: this fixture may first be asked for from inside a running event loop.
    client = redis_sync.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except (OSError, redis_exceptions.RedisError) as error:
        message = f"Redis at {url} is unreachable ({error}); set CREDITS_TEST_REDIS_URL"
        if REQUIRE_SERVICES:
            pytest.fail(f"CREDITS_REQUIRE_SERVICES=1 but {message}", pytrace=False)
        pytest.skip(message)
    finally:
        client.close()
    return url


def new_redis_namespace() -> str:
    return f"credits-test-{secrets.token_hex(5)}:"


async def delete_redis_namespace(redis_url: str, namespace: str) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def hanging_redis() -> AsyncIterator[str]:
    """The URL of a "Redis" that accepts connections and never answers (a hung server)."""

    async def accept_and_say_nothing(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    finally:
        server.close()


@pytest.fixture
async def redis_namespace(redis_url: str) -> AsyncIterator[str]:
    """A key prefix no other test uses; its keys are deleted when the test ends."""
    namespace = new_redis_namespace()
    yield namespace
    await delete_redis_namespace(redis_url, namespace)


@pytest.fixture(scope="session")
def sqlite_url() -> Iterator[str]:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="credits-sqlite-"))
    url = f"sqlite:///{directory / 'credits.db'}"
    run_sync(_migrate_and_audit(url, check_audit=False))
    yield url
    run_sync(_migrate_and_audit(url, check_audit=True))


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


def assert_no_failed_batches(ledger: Ledger, request: pytest.FixtureRequest) -> None:
    """A failed group-commit batch hands its calls to the one-call path, which answers them
    right: without this check a broken batch path would pass every test, only slower."""
    if request.node.get_closest_marker("batch_failures_expected"):
        return
    for batcher in (ledger.reserve_batcher, ledger.resolve_batcher):
        if batcher is not None:
            assert batcher.counters.failed_batches == 0, (
                f"{type(batcher).__name__} had failed batches (see the logged traceback)"
            )


@pytest.fixture
async def ledger(
    database_url: str,
    clock: ManualClock,
    accounts: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> AsyncIterator[Ledger]:
    """A ledger on a manual clock; its accounts must audit clean when the test ends."""
    engine = create_engine(database_url)
    try:
        ledger = Ledger(engine, clock, LedgerSettings())
        yield ledger
        await ledger.close()
        report = await audit(engine, accounts.prefix)  # type: ignore[attr-defined]
        assert report.clean, "\n".join(map(str, report.mismatches))
        assert_no_failed_batches(ledger, request)
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
    accounts: Callable[[str], str], request: pytest.FixtureRequest
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
        channel = open_channel(address)
        server = RunningServer(app, address, channel, credits_pb2_grpc.CreditsServiceStub(channel))
        running.append(server)
        return server

    yield start
    for server in running:
        await server.channel.close()
        await asyncio.wait_for(server.app.stop(grace_seconds=0), 30)
        assert_no_failed_batches(server.app.ledger, request)
        await assert_audit_clean(server.app.config.database_url, accounts.prefix)  # type: ignore[attr-defined]


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A Redis server of this test's own, so the test can kill it: (process, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if REQUIRE_SERVICES:
            pytest.fail("CREDITS_REQUIRE_SERVICES=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    yield process, f"redis://127.0.0.1:{port}/0"
    if process.poll() is None:
        process.kill()
    process.wait(10)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With CREDITS_REQUIRE_SERVICES=1 (CI), Postgres and Redis tests may not be deselected."""
    for service in ("postgres", "redis"):
        if REQUIRE_SERVICES and not any(item.get_closest_marker(service) for item in items):
            raise pytest.UsageError(
                f"CREDITS_REQUIRE_SERVICES=1 but no {service} test was collected"
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    for service, variable in (
        ("postgres", "CREDITS_TEST_POSTGRES_URL"),
        ("redis", "CREDITS_TEST_REDIS_URL"),
    ):
        skips = [r for r in skipped if service in getattr(r, "keywords", {})]
        if skips:
            terminalreporter.write_sep(
                "!",
                f"{len(skips)} {service.upper()} TESTS SKIPPED: no {service} server was reachable. "
                f"Set {variable} to run them.",
                red=True,
                bold=True,
            )
