"""The batchers' own connections (store/batch_pool.py): reused, bounded, never handed on in an
unknown state, and taken and given back without a trip round the event loop.

Against this machine's Postgres: the pool's whole job is its connections' lifecycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from conftest import asyncpg_dsn
from sqlalchemy.ext.asyncio import AsyncEngine

from store.batch_pool import GENERIC_PLAN_SETTINGS, BatchConnections, _LazyPool
from store.batching import Admitting, Waiting
from store.database import PoolSettings, create_engine

pytestmark = [pytest.mark.postgres]


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def make_pool(engine: AsyncEngine) -> AsyncIterator[Callable[..., _LazyPool]]:
    pools: list[_LazyPool] = []

    def make(size_max: int = 2, checkout_timeout_seconds: float = 5.0) -> _LazyPool:
        settings = replace(PoolSettings(), checkout_timeout_seconds=checkout_timeout_seconds)
        pool = _LazyPool(engine, settings, size_max, dict(GENERIC_PLAN_SETTINGS))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def backend_pid(pool: _LazyPool) -> int:
    async with pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    return pid


async def test_a_connection_given_back_is_taken_again_with_its_session(
    make_pool: Callable[..., _LazyPool],
) -> None:
    pool = make_pool()
    assert pool.sizes() == (0, 0)  # opened on first use
    first = await backend_pid(pool)
    assert pool.sizes() == (1, 0)
    assert await backend_pid(pool) == first
    async with pool.acquire() as conn:
        assert pool.sizes() == (1, 1)
        for name, value in GENERIC_PLAN_SETTINGS.items():
            assert await conn.fetchval(f"SHOW {name}") == value
        assert await conn.fetchval("SHOW application_name") == "credits-server-batches"


async def test_taking_an_idle_connection_and_giving_it_back_stays_off_the_event_loop(
    make_pool: Callable[..., _LazyPool],
) -> None:
    """The lever itself: a batch that finds a connection idle goes round the loop no more for
    it (asyncpg's pool took four trips: a task for the checkout, another for the return)."""
    pool = make_pool()
    await backend_pid(pool)  # one idle connection now
    rounds = 0
    stop = False

    def tick() -> None:
        nonlocal rounds
        rounds += 1
        if not stop:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    await asyncio.sleep(0)  # the ticker runs once per trip round the loop from here
    before = rounds
    for _ in range(10):
        async with pool.acquire():
            pass
    after = rounds
    stop = True
    await asyncio.sleep(0)
    assert after == before


async def test_at_most_size_max_open_and_a_waiting_checkout_gets_the_next_returned(
    make_pool: Callable[..., _LazyPool],
) -> None:
    pool = make_pool(size_max=2)
    release = asyncio.Event()
    both_held = asyncio.Event()
    pids: list[int] = []

    async def hold() -> None:
        async with pool.acquire() as conn:
            pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
            if len(pids) == 2:
                both_held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.wait_for(both_held.wait(), 5)
    waiting = asyncio.create_task(backend_pid(pool))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert pool.sizes() == (2, 2)
    release.set()
    assert await waiting in pids  # a connection handed over, not a third one opened
    await asyncio.gather(*holders)
    assert pool.sizes() == (2, 0)


async def test_a_checkout_waits_at_most_its_timeout(make_pool: Callable[..., _LazyPool]) -> None:
    pool = make_pool(size_max=1, checkout_timeout_seconds=0.1)
    async with pool.acquire():
        with pytest.raises(TimeoutError):
            await backend_pid(pool)
    # The waiter that gave up is gone: the connection went idle, not to it.
    assert pool.sizes() == (1, 0)
    await backend_pid(pool)


async def test_a_block_that_raises_does_not_hand_its_connection_on(
    make_pool: Callable[..., _LazyPool],
) -> None:
    """A statement cancelled half-way or a transaction left open must not reach the next
    batch: the connection is closed and the next checkout opens another."""
    pool = make_pool(size_max=1)
    with pytest.raises(asyncio.TimeoutError):
        async with pool.acquire() as conn:
            first_pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("BEGIN")
            async with asyncio.timeout(0.05):
                await conn.execute("SELECT pg_sleep(5)")
    assert conn.is_closed()
    assert pool.sizes() == (0, 0)
    async with pool.acquire() as fresh:
        assert await fresh.fetchval("SELECT pg_backend_pid()") != first_pid
        assert not fresh.is_in_transaction()


async def test_a_checkout_waiting_while_a_connection_is_dropped_opens_its_own(
    make_pool: Callable[..., _LazyPool],
) -> None:
    pool = make_pool(size_max=1)
    started = asyncio.Event()

    async def fail() -> None:
        async with pool.acquire():
            started.set()
            await asyncio.sleep(0.05)
            raise RuntimeError("the batch failed")

    failing = asyncio.create_task(fail())
    await started.wait()
    waiting = asyncio.create_task(backend_pid(pool))
    with pytest.raises(RuntimeError):
        await failing
    assert await asyncio.wait_for(waiting, 5) > 0
    assert pool.sizes() == (1, 0)


async def test_a_connection_the_server_closed_while_idle_is_not_handed_out(
    make_pool: Callable[..., _LazyPool], postgres_url: str
) -> None:
    pool = make_pool(size_max=1)
    idle_pid = await backend_pid(pool)
    killer = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", idle_pid)
    finally:
        await killer.close()
    # asyncpg notices the closed socket once the loop has read its end.
    for _ in range(100):
        if pool._idle[0].is_closed():
            break
        await asyncio.sleep(0.01)
    assert await backend_pid(pool) != idle_pid
    assert pool.sizes() == (1, 0)


async def test_close_closes_idle_connections_then_those_in_use_as_they_return(
    make_pool: Callable[..., _LazyPool],
) -> None:
    pool = make_pool(size_max=2)
    await backend_pid(pool)
    async with pool.acquire() as held:
        await pool.close()
        assert pool.sizes() == (1, 1)
        with pytest.raises(asyncpg.InterfaceError):
            await backend_pid(pool)
    assert held.is_closed()
    assert pool.sizes() == (0, 0)


async def test_batch_transactions_commit_and_roll_back(engine: AsyncEngine) -> None:
    connections = BatchConnections(engine, size_max=1, generic_size_max=1)
    try:
        with pytest.raises(RuntimeError):
            async with connections.transaction() as conn:
                await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (i int)")
                raise RuntimeError("rolled back")
        async with connections.transaction() as conn:
            # The temporary table went with the rolled-back transaction and its connection.
            assert await conn.fetchval("SELECT to_regclass('pg_temp.t')") is None
        assert connections.connections() == (1, 0)
    finally:
        await connections.close()


async def test_a_batch_rate_check_runs_once_however_often_it_is_asked() -> None:
    checked: list[int] = []

    async def admit(batch: list[Waiting[int, int]]) -> list[Waiting[int, int]]:
        checked.append(len(batch))
        await asyncio.sleep(0)
        return batch[:1]

    loop = asyncio.get_running_loop()
    batch = [Waiting(n, n, loop.create_future()) for n in range(3)]

    inline: Admitting[int, int] = Admitting(admit, batch)
    assert await inline.result() == batch[:1]
    inline.start()  # too late to overlap anything: no second check
    assert await inline.result() == batch[:1]

    beside: Admitting[int, int] = Admitting(admit, batch)
    beside.start()
    beside.start()
    assert await beside.result() == batch[:1]
    assert await beside.result() == batch[:1]
    assert checked == [3, 3]


def test_building_the_pools_opens_nothing(engine: Any) -> None:
    """Opened on first use: a server whose Postgres is down at start is not held up by them."""
    connections = BatchConnections(engine)
    assert connections.connections() == (0, 0)
