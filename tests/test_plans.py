"""The generic plans of Reserve's two batch statements reach every table by an index lookup,
whatever the tables held when the plan was made; and Commit and Release update a reservation by
its key, whatever the statistics say of pending reservations.

Those statements run on connections that plan each statement once (store/batch_pool.py), so
one plan serves every later batch of that connection. A plan made while a table was empty or
small must not scan that table once it has grown: the bench met exactly that with the earlier
form of the read (made while `idempotency_keys` was empty, its plan walked the whole key index
in every batch, 7 ms per read after a minute). Each statement's generic plan is checked in
three states: a new database, wallets loaded but no keys yet (a fresh deployment of a migrated
ledger), and everything loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from conftest import _drop_database, asyncpg_dsn, create_migrated_database, run_sync
from sqlalchemy import update
from sqlalchemy.dialects import postgresql

from store.batch_pool import GENERIC_PLAN_SETTINGS, BatchConnections
from store.database import create_engine
from store.ledger import pending_guard
from store.reserve_batch import _GUARDED_WRITE_SQL, _SNAPSHOT_SQL
from store.resolve_batch import _WRITE_SQL as _RESOLVE_WRITE_SQL
from store.schema import reservations

pytestmark = [pytest.mark.postgres]

STATEMENTS = {"read": _SNAPSHOT_SQL, "write": _GUARDED_WRITE_SQL}
ROWS = 20_000
TABLES = {"accounts", "wallets", "grants", "idempotency_keys"}

_LOAD_WALLETS_SQL = f"""
INSERT INTO accounts (account_id, status, created_at_us, updated_at_us)
SELECT 'plan' || i, 'active', 0, 0 FROM generate_series(1, {ROWS}) AS i;
INSERT INTO wallets (account_id, credit_type, last_sequence, reserved, created_at_us)
SELECT 'plan' || i, 'default', 1, 0, 0 FROM generate_series(1, {ROWS}) AS i;
INSERT INTO grants (account_id, grant_id, credit_type, amount, remaining, held, consumed,
                    expired, source, priority, effective_at_us, external_ref, metadata_json,
                    idempotency_key, created_at_us)
SELECT 'plan' || i, 'grt_plan' || i, 'default', 10, 10, 0, 0, 0, 'purchase', 100, 0, '', '{{}}',
       'seed', 0
FROM generate_series(1, {ROWS}) AS i;
ANALYZE accounts, wallets, grants, idempotency_keys;
"""
_LOAD_KEYS_SQL = f"""
INSERT INTO idempotency_keys
    (account_id, idempotency_key, operation, request_json, outcome_json, created_at_us)
SELECT 'plan' || i, 'key' || i, 'reserve', '{{}}', '{{}}', 0 FROM generate_series(1, {ROWS}) AS i;
ANALYZE idempotency_keys;
"""


@pytest.fixture(scope="module")
def private_database(postgres_admin_url: str | None, postgres_url: str) -> Iterator[str]:
    """A database of this module's own: the tests load and empty its tables."""
    assert postgres_admin_url is not None  # postgres_url failed or skipped otherwise
    url = run_sync(create_migrated_database(postgres_admin_url))
    yield url
    run_sync(_drop_database(postgres_admin_url, url))


@pytest.fixture
async def conn(private_database: str) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(asyncpg_dsn(private_database))
    try:
        yield connection
    finally:
        await connection.close()


async def generic_plan(conn: Any, sql: str) -> dict[str, Any]:
    """The plan Postgres keeps for `sql` on a generic-plan connection (no parameter values)."""
    for name, value in GENERIC_PLAN_SETTINGS.items():
        await conn.execute(f"SET {name} = {value}")
    parameters = max(int(n) for n in re.findall(r"\$(\d+)", sql))
    await conn.execute(f"PREPARE probe AS {sql}")
    try:
        nulls = ", ".join(["NULL"] * parameters)
        (text,) = await conn.fetchrow(f"EXPLAIN (FORMAT JSON) EXECUTE probe({nulls})")
    finally:
        await conn.execute("DEALLOCATE probe")
    plan: dict[str, Any] = json.loads(text)[0]["Plan"]
    return plan


def table_scans(
    node: dict[str, Any], tables: frozenset[str] | set[str] = TABLES
) -> Iterator[dict[str, Any]]:
    # Inserts and updates (ModifyTable) name their table too: only reads are scans.
    if node.get("Relation Name") in tables and node["Node Type"].endswith("Scan"):
        yield node
    for child in node.get("Plans", ()):
        yield from table_scans(child, tables)


def assert_index_lookups_only(plan: dict[str, Any], where: str) -> None:
    scans = list(table_scans(plan))
    assert scans, f"{where}: no table in the plan?"
    for scan in scans:
        described = f"{where}: {scan['Node Type']} on {scan['Relation Name']}"
        # The statements only ever look rows up by their keys: a scan without an index
        # condition reads a whole table (or index) per batch, and grows with it.
        assert scan["Node Type"] in {"Index Scan", "Index Only Scan"}, described
        assert "Index Cond" in scan, f"{described} reads the whole index"


async def test_generic_plans_look_rows_up_by_key_whatever_the_tables_held(conn: Any) -> None:
    states = (
        ("empty database", ""),
        ("wallets, no keys", _LOAD_WALLETS_SQL),
        ("everything loaded", _LOAD_KEYS_SQL),
    )
    for state, load in states:
        if load:
            await conn.execute(load)
        for name, sql in STATEMENTS.items():
            assert_index_lookups_only(await generic_plan(conn, sql), f"{name}, {state}")


async def test_batch_connections_plan_as_documented(private_database: str) -> None:
    """Reserve's two statements get generic plans; transactions (the locking path, Commit and
    Release batches) plan afresh like every other connection of the server."""
    engine = create_engine(private_database)
    connections = BatchConnections(engine)
    shown = "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan')"
    try:
        async with connections.generic() as generic:
            assert tuple(await generic.fetchrow(shown)) == ("force_generic_plan", "off")
        async with connections.transaction() as transaction:
            assert tuple(await transaction.fetchrow(shown)) == ("force_custom_plan", "on")
        assert connections.connections() == (2, 0)
    finally:
        await connections.close()
        await engine.dispose()


def _reservations_sql(first: int, last: int, status: str) -> str:
    resolved = "NULL" if status == "pending" else "1"
    committed = "0" if status == "pending" else "1"
    return f"""
INSERT INTO reservations (account_id, reservation_id, credit_type, amount, status, created_at_us,
    expires_at_us, resolved_at_us, amount_committed, amount_released, amount_expired, action,
    request_id, metadata_json, idempotency_key, reserve_sequence, resolution_sequence)
SELECT 'res' || i, 'rsv_' || i, 'default', 1, '{status}', 0, 0, {resolved}, {committed}, 0, 0,
       '', '', '{{}}', 'k' || i, 2, {resolved}
FROM generate_series({first}, {last}) AS i;
"""


async def test_resolving_updates_a_reservation_by_its_key_whatever_the_statistics_say(
    conn: Any,
) -> None:
    """Statistics taken while nearly every reservation was resolved (a ledger with history, no
    autovacuum since) made the planner expect about one pending reservation, and reach the
    reservation to resolve through the hold sweeper's partial index of pending ones: a scan of
    every pending reservation per Commit or Release batch (60 ms per batch at 23,000 pending,
    in the bench). Both paths must look it up by its primary key."""
    await conn.execute(_reservations_sql(1, ROWS, "committed"))
    await conn.execute("ANALYZE reservations")
    await conn.execute(_reservations_sql(ROWS + 1, ROWS + 5_000, "pending"))
    # Commit and Release batches plan on transaction connections: afresh, with the values.
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    account, reservation = f"res{ROWS + 7}", f"rsv_{ROWS + 7}"
    no_text: list[str] = []
    no_number: list[int] = []
    batch = [
        *(no_text, no_text, no_number, no_number, no_number, no_number),  # grants: $1-$6
        1,  # now: $7
        *([account], [reservation], ["committed"], [1], [0], [3]),  # reservations: $8-$13
        *(no_text, no_text, no_number, no_text, no_number, no_number),  # journal: $14-$19
        *(no_number, no_text, no_text, no_text, no_text, no_text),  # journal: $20-$25
        *(no_text, no_text, no_number, no_number),  # wallets: $26-$29
    ]
    (batch_plan,) = await conn.fetchrow(f"EXPLAIN (FORMAT JSON) {_RESOLVE_WRITE_SQL}", *batch)
    one_call = (
        update(reservations)
        .where(
            reservations.c.account_id == account,
            reservations.c.reservation_id == reservation,
            pending_guard(),
        )
        .values(status="committed")
        .compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    )
    (one_call_plan,) = await conn.fetchrow(f"EXPLAIN (FORMAT JSON) {one_call}")
    for where, plan in (("batch", batch_plan), ("one call", one_call_plan)):
        scans = list(table_scans(json.loads(plan)[0]["Plan"], {"reservations"}))
        assert scans, f"{where}: no scan of reservations?"
        for scan in scans:
            described = f"{where}: {scan['Node Type']} on {scan.get('Index Name')}"
            assert scan.get("Index Name") == "pk_reservations", described
            assert "Index Cond" in scan, described
