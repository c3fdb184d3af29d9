"""The group-commit batchers' own asyncpg connections, beside SQLAlchemy's pool.

A batch is a few round trips on one connection, so what each checkout costs shows in every
batch. Through SQLAlchemy's async pool a checkout is a greenlet switch plus the pool's
bookkeeping, and asyncpg's pool runs each checkout and return in a task of its own; here
(`_LazyPool`) both are plain calls on asyncpg connections.

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
import collections
import inspect
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # no stubs; the pool is typed Any here
from sqlalchemy.ext.asyncio import AsyncEngine

from store import limits
from store.database import PoolSettings, postgres_session_settings

_CONNECT_PARAMETERS = frozenset(inspect.signature(asyncpg.connect).parameters)


# Sessions of the generic pool: a plan made once per statement and connection, with whole-table
# scans priced out (an index is always there for the statements that run on it).
GENERIC_PLAN_SETTINGS: Final = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


class _LazyPool:
    """Batch connections with these session settings: opened as needed, at most `size_max`, and
    kept for the process's life.

    Not asyncpg's pool, whose checkout with a timeout runs in a task of its own
    (`asyncio.wait_for`) and whose return runs in another (`asyncio.shield`): four more trips
    round the event loop per batch, the return's two before the batch's callers are answered.
    Behind a busy loop each trip waits for every other call's work queued before it
    (docs/performance.md, lever 22). Here taking an idle connection and giving one back are
    plain calls; only a wait for a free connection, or opening one, awaits."""

    def __init__(
        self, engine: AsyncEngine, settings: PoolSettings, size_max: int, session: dict[str, str]
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.size_max = size_max
        self.session = session
        # Idle connections, the last returned on top (its pages are the warmest); how many are
        # open or opening; checkouts waiting for one (a None result: open one yourself).
        self._idle: list[Any] = []
        self._opened = 0
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._closed = False

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        conn = self._take_idle()
        if conn is None:
            conn = await self._checkout()
        try:
            yield conn
        except BaseException:
            # Whatever the block left behind (a statement cancelled half-way, a transaction
            # not ended) is not handed to the next batch: this connection goes.
            self._discard(conn)
            raise
        self._give_back(conn)

    def _take_idle(self) -> Any:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._discard(conn)  # closed by the server meanwhile
        return None

    async def _checkout(self) -> Any:
        while True:
            if self._closed:
                raise asyncpg.InterfaceError("the batch connections are closed")
            if self._opened < self.size_max:
                return await self._open()
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.settings.checkout_timeout_seconds):
                    conn = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Handed over as this checkout gave up: pass it on.
                    handed = waiter.result()
                    if handed is None:
                        self._wake_one(None)
                    else:
                        self._give_back(handed)
                else:
                    waiter.cancel()
                raise
            if conn is not None:
                return conn
            # A connection went: open one in its place.

    async def _open(self) -> Any:
        self._opened += 1
        try:
            # The same host, user, database and TLS options as the engine's connections, less
            # the options that are SQLAlchemy's own (its statement cache size, say).
            _, url_kwargs = self.engine.dialect.create_connect_args(self.engine.url)
            connect_kwargs = {k: v for k, v in url_kwargs.items() if k in _CONNECT_PARAMETERS}
            return await asyncpg.connect(
                **connect_kwargs,
                timeout=self.settings.connect_timeout_seconds,
                command_timeout=self.settings.statement_timeout_ms / 1000,
                server_settings={
                    **postgres_session_settings(self.settings),
                    "application_name": "credits-server-batches",
                    **self.session,
                },
            )
        except BaseException:
            self._opened -= 1
            self._wake_one(None)
            raise

    def _give_back(self, conn: Any) -> None:
        """A connection a block ended with cleanly: to the first checkout waiting, else idle.
        It needs no reset: it only ever ran statements that commit on their own and
        transactions ended by commit or rollback, and set nothing in its session (asyncpg's
        reset is one more round trip, RESET ALL, UNLISTEN and more)."""
        if self._closed or conn.is_closed():
            self._discard(conn)
        elif not self._wake_one(conn):
            self._idle.append(conn)

    def _discard(self, conn: Any) -> None:
        conn.terminate()
        self._opened -= 1
        self._wake_one(None)

    def _wake_one(self, conn: Any) -> bool:
        """Hands `conn` (None: leave to open one) to the first checkout still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def sizes(self) -> tuple[int, int]:
        """(open, in use) right now."""
        return self._opened, self._opened - len(self._idle)

    async def close(self) -> None:
        """Closes the idle connections; one in use closes when its block ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        for conn in idle:
            self._opened -= 1
            try:
                await asyncio.wait_for(conn.close(), self.settings.connect_timeout_seconds)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()


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
