"""Engines for Postgres (asyncpg) and the embedded SQLite default (aiosqlite)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry


@dataclass(frozen=True)
class PoolSettings:
    size: int = 10
    overflow_max: int = 10
    # A caller waits at most this long for a connection before the RPC fails UNAVAILABLE.
    checkout_timeout_seconds: float = 5.0
    connect_timeout_seconds: float = 5.0
    # Upper bound for one statement; a stuck query must not hold a wallet lock forever.
    statement_timeout_ms: int = 10_000


def normalise_url(url: str) -> URL:
    """Accepts the URLs ops paste (postgres://, postgresql://, sqlite:///); picks async drivers."""
    parsed = make_url(
        url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url
    )
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: use postgresql:// or sqlite:///"
    )


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def postgres_session_settings(pool: PoolSettings) -> dict[str, str]:
    """What every Postgres session of the server runs with (the engine's and the batches')."""
    return {
        # Durability is not negotiable for a ledger: a commit is on disk when acked.
        "synchronous_commit": "on",
        "statement_timeout": str(pool.statement_timeout_ms),
        "idle_in_transaction_session_timeout": "30000",
        # Plan each statement for the data it meets. Postgres's default may switch a prepared
        # statement to a generic plan for good after five runs; made while a table was nearly
        # empty (a new deployment), that plan scans the whole table ever after. The benchmark
        # caught it: in a fresh database Reserve's p50 at half of peak went from 8 to 19 ms.
        # Planning costs tens of microseconds for a simple statement and up to 0.7 ms for a
        # batch's; Reserve's batch statements are written to be planned once instead
        # (store/batch_pool.py).
        "plan_cache_mode": "force_custom_plan",
    }


def create_engine(url: str, pool: PoolSettings | None = None) -> AsyncEngine:
    pool = pool or PoolSettings()
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(parsed)
    return create_async_engine(
        parsed,
        pool_size=pool.size,
        max_overflow=pool.overflow_max,
        pool_timeout=pool.checkout_timeout_seconds,
        # No pre-ping: it costs a round trip on every checkout (measured: ~4% of server CPU on
        # Reserve). A dead connection fails its call with UNAVAILABLE (retryable, nothing
        # changed) and SQLAlchemy then discards the pool's connections of that age.
        pool_pre_ping=False,
        pool_recycle=1800,
        # READ COMMITTED with explicit row locks: each writer locks its wallet row first.
        isolation_level="READ COMMITTED",
        connect_args={
            "timeout": pool.connect_timeout_seconds,
            "command_timeout": pool.statement_timeout_ms / 1000,
            "server_settings": {
                "application_name": "credits-server",
                **postgres_session_settings(pool),
            },
        },
    )


def _create_sqlite_engine(parsed: URL) -> AsyncEngine:
    database = parsed.database or ""
    if database and database != ":memory:":
        pathlib.Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets reads run beside the single writer; FULL makes each commit durable.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    return engine
