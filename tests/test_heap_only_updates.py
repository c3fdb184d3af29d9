"""Reserve and Commit update wallet and grant rows heap-only on Postgres (store/schema.py).

A heap-only (HOT) update writes the new row version on the same page and no index entry; any
other update writes a new entry into every index of the table. With 1,000,000 wallets most
index pages are not in memory, so each non-HOT update costs page reads and, after a checkpoint,
whole pages written to the WAL (docs/performance.md, eighth session). Postgres counts both kinds
per table (pg_stat_user_tables), which is what this test reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import _drop_database, asyncpg_dsn, create_migrated_database

from store.clock import ManualClock
from store.database import create_engine
from store.ledger import Ledger, LedgerSettings
from store.model import AddCreditsCommand, Caller, CommitCommand, GrantSource, ReserveCommand

pytestmark = [pytest.mark.postgres]

CALLER = Caller(principal="svc:test", action="test.run", request_id="req-1")
WALLETS = 300
CONCURRENT_CALLS = 50
# Postgres publishes a backend's table counters at most once a second, and at once when the
# backend exits (the ledger's connections, closed): wait that long at most.
STATS_WAIT_SECONDS = 15.0
TABLES = ("wallets", "grants")


@pytest.fixture
async def database(postgres_admin_url: str | None, postgres_url: str) -> AsyncIterator[str]:
    """A database of this test's own, so that its table counters count only this test."""
    assert postgres_admin_url is not None  # postgres_url failed or skipped otherwise
    url = await create_migrated_database(postgres_admin_url)
    yield url
    await _drop_database(postgres_admin_url, url)


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def updates(url: str, at_least: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(updates, heap-only updates) per table, once each table shows at least `at_least` of its
    updates (the ledger's backends have published their counters)."""
    deadline = time.monotonic() + STATS_WAIT_SECONDS
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        while True:
            rows = await conn.fetch(
                "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE relname = ANY($1::text[])",
                list(TABLES),
            )
            counts = {r["relname"]: (int(r["n_tup_upd"]), int(r["n_tup_hot_upd"])) for r in rows}
            if all(counts.get(t, (0, 0))[0] >= at_least[t] for t in TABLES):
                return counts
            assert time.monotonic() < deadline, f"counters never reached {at_least}: {counts}"
            await asyncio.sleep(0.2)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
    finally:
        await conn.close()


async def test_reserve_and_commit_update_wallets_and_grants_heap_only(database: str) -> None:
    accounts = [f"hot{i:04d}" for i in range(WALLETS)]
    clock = ManualClock(1_800_000_000_000_000)

    engine = create_engine(database)
    ledger = Ledger(engine, clock, LedgerSettings())
    try:
        for start in range(0, WALLETS, CONCURRENT_CALLS):
            await asyncio.gather(
                *(
                    ledger.add_credits(
                        AddCreditsCommand(a, "default", 10, f"grant-{a}", GrantSource.PURCHASE),
                        CALLER,
                    )
                    for a in accounts[start : start + CONCURRENT_CALLS]
                )
            )
    finally:
        await ledger.close()
        await engine.dispose()
    # Every AddCredits updated its wallet once (its sequence, after the GRANT entry).
    before = await updates(database, at_least={"wallets": WALLETS, "grants": 0})
    # Pages as a bulk load leaves them: packed with live rows, up to the tables' fillfactor.
    await execute(database, "VACUUM FULL wallets, grants")

    engine = create_engine(database)
    ledger = Ledger(engine, clock, LedgerSettings())
    try:
        assert ledger.reserve_batcher is not None, "the batched path is the one to measure"
        # One call at a time: Postgres makes room on a full page by pruning the row versions
        # no transaction can see any more, and calls in flight together would make that depend
        # on their interleaving, not on the schema.
        reserved = [
            await ledger.reserve(ReserveCommand(a, "default", 3, f"reserve-{a}", 600), CALLER)
            for a in accounts
        ]
        for a, r in zip(accounts, reserved, strict=True):
            await ledger.commit(CommitCommand(a, r.reservation.reservation_id, 2), CALLER)
    finally:
        await ledger.close()
        await engine.dispose()
    # Each Reserve and each Commit updated one wallet and one grant.
    after = await updates(database, at_least={t: before[t][0] + 2 * WALLETS for t in TABLES})

    for table in TABLES:
        updated = after[table][0] - before[table][0]
        heap_only = after[table][1] - before[table][1]
        assert updated >= 2 * WALLETS, (table, updated)
        assert heap_only == updated, f"{table}: {heap_only} of {updated} updates heap-only"
