"""The group-commit batchers' own asyncpg connections, beside SQLAlchemy's pool.

A batch is a few round trips on one connection, so what each checkout costs shows in every
batch. Through SQLAlchemy's async pool a checkout is a greenlet switch plus the pool's
bookkeeping; an asyncpg pool hands over a connection directly.

They plan every statement afresh, as every server connection does (`plan_cache_mode` in
store/database.py): about 0.4 ms of Postgres's CPU per batch, shared by its calls.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs; the pool is typed Any here
from sqlalchemy.ext.asyncio import AsyncEngine

from store import limits
from store.database import PoolSettings, postgres_session_settings

_CONNECT_PARAMETERS = frozenset(inspect.signature(asyncpg.connect).parameters)


async def _keep_session(conn: Any) -> None:
    """A returned connection needs no reset: it only ever ran statements that commit on their
    own and transactions ended by commit or rollback, and set nothing in its session. asyncpg's
    default reset is one more round trip (RESET ALL, UNLISTEN, ...) in every batch's path."""


class BatchConnections:
    """At most `size_max` connections, opened on first use and kept for the process's life."""

    def __init__(self, engine: AsyncEngine, size_max: int = limits.BATCH_CONNECTIONS_MAX) -> None:
        self.engine = engine
        self.size_max = size_max
        self.settings = PoolSettings()
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def _open(self) -> Any:
        async with self._opening:
            if self._pool is None:
                # The same host, user, database and TLS options as the engine's connections.
                _, url_kwargs = self.engine.dialect.create_connect_args(self.engine.url)
                # Less the options that are SQLAlchemy's own (its statement cache size, say).
                connect_kwargs = {k: v for k, v in url_kwargs.items() if k in _CONNECT_PARAMETERS}
                self._pool = await asyncpg.create_pool(
                    **connect_kwargs,
                    min_size=0,
                    max_size=self.size_max,
                    reset=_keep_session,
                    timeout=self.settings.connect_timeout_seconds,
                    command_timeout=self.settings.statement_timeout_ms / 1000,
                    server_settings={
                        **postgres_session_settings(self.settings),
                        "application_name": "credits-server-batches",
                    },
                )
            return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A connection outside any transaction: each statement commits on its own."""
        pool = self._pool or await self._open()
        async with pool.acquire(timeout=self.settings.checkout_timeout_seconds) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A connection inside a READ COMMITTED transaction; commits when the block ends."""
        async with self.connection() as conn, conn.transaction(isolation="read_committed"):
            yield conn

    def connections(self) -> tuple[int, int]:
        """(open, in use) right now, for the metrics."""
        if self._pool is None:
            return 0, 0
        opened = int(self._pool.get_size())
        return opened, opened - int(self._pool.get_idle_size())

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
