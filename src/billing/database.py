"""Engines for the listener's own tables: SQLite (aiosqlite) by default, Postgres (asyncpg).

The listener keeps its own small database (the inbox and what it remembers of the grants it
made). It may share a Postgres database with the ledger: its tables are prefixed `billing_` and
its Alembic history lives in its own version table.
"""

from __future__ import annotations

import pathlib
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

POOL_SIZE = 5
POOL_CHECKOUT_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5.0
STATEMENT_TIMEOUT_MS = 10_000
SQLITE_BUSY_TIMEOUT_MS = 5000


def normalise_url(url: str) -> URL:
    """Accepts postgres://, postgresql:// and sqlite:/// URLs; picks the async drivers."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: use postgresql:// or sqlite:///"
    )


def create_engine(url: str) -> AsyncEngine:
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(parsed)
    return create_async_engine(
        parsed,
        pool_size=POOL_SIZE,
        max_overflow=POOL_SIZE,
        pool_timeout=POOL_CHECKOUT_TIMEOUT_SECONDS,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
        connect_args={
            "timeout": CONNECT_TIMEOUT_SECONDS,
            "command_timeout": STATEMENT_TIMEOUT_MS / 1000,
            "server_settings": {
                "application_name": "credits-listener",
                # An acknowledged webhook must survive a crash: Stripe will not send it again.
                "synchronous_commit": "on",
                "statement_timeout": str(STATEMENT_TIMEOUT_MS),
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
        # WAL lets the webhook insert while the worker reads; FULL makes an acknowledged event
        # durable before Stripe hears 200.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    return engine


def upsert(conn: AsyncConnection, table: Table) -> Any:
    """An INSERT that supports ON CONFLICT DO NOTHING / DO UPDATE on both dialects."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
