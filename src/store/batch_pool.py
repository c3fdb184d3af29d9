"""The group-commit batchers' own asyncpg connections, beside SQLAlchemy's pool.

A batch is a few round trips on one connection, so what each checkout costs shows in every
batch. Through SQLAlchemy's async pool a checkout is a greenlet switch plus the pool's
bookkeeping; an asyncpg pool hands over a connection directly.

Two pools. Transactions (`transaction()`: the Commit and Release batches, Reserve's locking
path) plan every statement afresh, as every server connection does (`plan_cache_mode` in
store/database.py). Reserve's two self-committing statements (`generic()`) run on connections
that plan each statement once, generically, and never scan a table whole: planning them afresh
cost 1.07 ms of Postgres's CPU per batch at half of Reserve's peak, more than running them
(0.40 ms bind against 0.31 ms execute for the read, 0.67 against 0.85 for the write). A generic
plan outlives the table sizes it was made for, so those statements are written to have one plan
whatever the sizes (LATERAL lookups, store/reserve_batch.py), and tests/test_plans.py checks
the plans made on an empty, a half-loaded and a loaded database.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # no stubs; the pool is typed Any here
from sqlalchemy.ext.asyncio import AsyncEngine

from store import limits
from store.database import PoolSettings, postgres_session_settings

_CONNECT_PARAMETERS = frozenset(inspect.signature(asyncpg.connect).parameters)


async def _keep_session(conn: Any) -> None:
    """A returned connection needs no reset: it only ever ran statements that commit on their
    own and transactions ended by commit or rollback, and set nothing in its session. asyncpg's
    default reset is one more round trip (RESET ALL, UNLISTEN, ...) in every batch's path."""


# Sessions of the generic pool: a plan made once per statement and connection, with whole-table
# scans priced out (an index is always there for the statements that run on it).
GENERIC_PLAN_SETTINGS: Final = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


class _LazyPool:
    """One asyncpg pool of batch connections with these session settings, opened on first use
    and kept for the process's life."""

    def __init__(
        self, engine: AsyncEngine, settings: PoolSettings, size_max: int, session: dict[str, str]
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.size_max = size_max
        self.session = session
        self._pool: Any = None
        self._opening = asyncio.Lock()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        pool = self._pool or await self._open()
        async with pool.acquire(timeout=self.settings.checkout_timeout_seconds) as conn:
            yield conn

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
                        **self.session,
                    },
                )
            return self._pool

    def sizes(self) -> tuple[int, int]:
        """(open, in use) right now."""
        if self._pool is None:
            return 0, 0
        opened = int(self._pool.get_size())
        return opened, opened - int(self._pool.get_idle_size())

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class BatchConnections:
    """At most `size_max` connections in transactions and `generic_size_max` for the generic
    statements."""

    def __init__(
        self,
        engine: AsyncEngine,
        size_max: int = limits.BATCH_CONNECTIONS_MAX,
        generic_size_max: int = limits.BATCH_GENERIC_CONNECTIONS_MAX,
    ) -> None:
        settings = PoolSettings()
        self._transactions = _LazyPool(engine, settings, size_max, {})
        self._generic = _LazyPool(engine, settings, generic_size_max, GENERIC_PLAN_SETTINGS)

    def generic(self) -> AbstractAsyncContextManager[Any]:
        """A connection outside any transaction, each statement committing on its own, planned
        generically: only for statements written for it (module docstring)."""
        return self._generic.acquire()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A connection inside a READ COMMITTED transaction; commits when the block ends."""
        async with (
            self._transactions.acquire() as conn,
            conn.transaction(isolation="read_committed"),
        ):
            yield conn

    def connections(self) -> tuple[int, int]:
        """(open, in use) right now, both pools, for the metrics."""
        opened, in_use = self._transactions.sizes()
        generic_opened, generic_in_use = self._generic.sizes()
        return opened + generic_opened, in_use + generic_in_use

    async def close(self) -> None:
        await self._transactions.close()
        await self._generic.close()
