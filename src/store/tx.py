"""Runs one unit of work in one database transaction and classifies what can go wrong.

UNAVAILABLE-class failures (cannot connect, connection lost, pool exhausted) become
StoreUnavailable; deadlocks and serialisation failures are retried a bounded number of times;
anything else is a bug and propagates. The transaction is rolled back on every failure, so no
half-applied change is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from store.database import is_sqlite
from store.errors import StoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

# Postgres SQLSTATEs that mean "try the same transaction again".
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# Postgres SQLSTATE classes that mean "the database is not there right now".
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53")  # connection, shutdown, resources
CONFLICT_RETRIES_MAX = 3


def _sqlstate(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return ""


def is_retryable_conflict(error: BaseException) -> bool:
    return _sqlstate(error) in _RETRYABLE_SQLSTATES


def is_unavailable(error: BaseException) -> bool:
    if isinstance(error, (OSError, asyncio.TimeoutError, sa_exc.TimeoutError)):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if _sqlstate(error).startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            # SQLite "database is locked" after busy_timeout, asyncpg connection errors.
            return True
        orig = error.orig
        return (
            isinstance(orig, (OSError, ConnectionError))
            or "connection" in type(orig).__name__.lower()
        )
    return False


class Transactor:
    """Hands out write and read transactions on one engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # SQLite has one writer at a time; queueing writers here instead of in SQLite's busy loop
        # keeps the embedded default free of "database is locked" errors.
        self._write_gate: asyncio.Lock | None = asyncio.Lock() if is_sqlite(engine) else None

    @contextlib.asynccontextmanager
    async def _gate(self) -> AsyncIterator[None]:
        if self._write_gate is None:
            yield
            return
        async with self._write_gate:
            yield

    async def write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        for attempt in range(1, CONFLICT_RETRIES_MAX + 1):
            try:
                async with self._gate(), self.engine.begin() as conn:
                    return await work(conn)
            except Exception as error:
                if is_retryable_conflict(error) and attempt < CONFLICT_RETRIES_MAX:
                    log.warning("transaction conflict (%s), retrying", _sqlstate(error))
                    continue
                if is_unavailable(error):
                    raise StoreUnavailable(
                        f"database unavailable: {type(error).__name__}"
                    ) from error
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def read(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        try:
            async with self.engine.connect() as conn:
                return await work(conn)
        except Exception as error:
            if is_unavailable(error):
                raise StoreUnavailable(f"database unavailable: {type(error).__name__}") from error
            raise
