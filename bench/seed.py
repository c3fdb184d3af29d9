"""Bulk data for the benchmark, written straight into the ledger's tables by the database itself.

Every statement is an `INSERT ... SELECT ... FROM generate_series(...)`: Postgres builds the rows
server-side, so 10,000 wallets take well under a second and 1,000,000 wallets with 10,000,000
journal rows take minutes, with no Python (and no RPC) per row. The rows are what the ledger
itself would have written, so the journal audit (`credits-server audit`) is clean on them:

- each wallet `PREFIX0000042`/default has one account, one grant of `balance` credits (source
  purchase, priority 100, never expiring) and a GRANT journal entry with sequence 1 whose
  grant_effects_json is `[["grt_...",balance,0,0,0]]` (grant id, remaining, held, consumed and
  expired deltas), like `Ledger._add_credits` writes;
- with `history_pairs` > 0 (bench/run.py seeds every wallet so), wallet i also has
  h = history_pairs + i % 2 past reservations of 1 credit, each committed: a RESERVE entry
  (`[[grant,-1,1,0,0]]`, amount 0) then a COMMIT entry (`[[grant,0,-1,1,0]]`, amount -1), a
  `committed` reservations row with its slice, so wallets.last_sequence = 1 + 2h and the grant
  has consumed = h.

Idempotency records of these past calls are not written (as if pruned after their retention).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
from naive_server import NAIVE_SCHEMA

ACCOUNT_DIGITS = 7
SEED_PRINCIPAL = "bench-seed"
SEED_ACTION = "bench.seed"
# Spacing of the seeded history's timestamps (microseconds between a wallet's entries).
HISTORY_STEP_US = 1000


@dataclass(frozen=True)
class WalletRange:
    prefix: str
    first: int
    count: int
    balance: int
    created_at_us: int
    history_pairs: int = 0

    @property
    def last(self) -> int:
        return self.first + self.count - 1


# $1 prefix, $2 first index, $3 last index, $4 created_at_us, $5 balance, $6 history pairs.
# `pairs` is how many committed reservations wallet i has: $6 + i % 2 when $6 > 0, else 0.
_ACCOUNT = f"$1 || lpad(i::text, {ACCOUNT_DIGITS}, '0')"
_PAIRS = "(CASE WHEN $6::int > 0 THEN $6::int + (i % 2)::int ELSE 0 END)"
_ID_STEM = "lpad(to_hex($4::bigint / 1000), 12, '0')"
_GRANT_ID = f"'grt_' || {_ID_STEM} || lpad(to_hex(i), 16, '0')"
_SERIES = "generate_series($2::bigint, $3::bigint) AS i"
_PARAMS_USED = "AND $5::bigint IS NOT NULL AND $6::int IS NOT NULL"

ACCOUNTS_SQL = f"""
INSERT INTO accounts (account_id, status, status_version, created_at_us, updated_at_us)
SELECT {_ACCOUNT}, 'active', 0, $4::bigint, $4::bigint FROM {_SERIES}
WHERE true {_PARAMS_USED}
"""
WALLETS_SQL = f"""
INSERT INTO wallets (account_id, credit_type, last_sequence, reserved, created_at_us)
SELECT {_ACCOUNT}, 'default', 1 + 2 * {_PAIRS}, 0, $4::bigint FROM {_SERIES}
WHERE true {_PARAMS_USED}
"""
GRANTS_SQL = f"""
INSERT INTO grants (account_id, grant_id, credit_type, amount, remaining, held, consumed, expired,
                    source, priority, effective_at_us, expires_at_us, external_ref,
                    metadata_json, idempotency_key, created_at_us)
SELECT {_ACCOUNT}, {_GRANT_ID}, 'default', $5::bigint, $5::bigint - {_PAIRS}, 0, {_PAIRS}, 0,
       'purchase', 100, $4::bigint, NULL, '', '{{}}', 'seed-grant', $4::bigint
FROM {_SERIES}
"""
GRANT_ENTRIES_SQL = f"""
INSERT INTO journal (account_id, credit_type, sequence, kind, amount, available_after,
                     reserved_after, grant_id, reservation_id, idempotency_key, principal, action,
                     request_id, created_at_us, grant_effects_json)
SELECT {_ACCOUNT}, 'default', 1, 'grant', $5::bigint, $5::bigint, 0, {_GRANT_ID}, '',
       'seed-grant', '{SEED_PRINCIPAL}', '{SEED_ACTION}', '', $4::bigint,
       '[["' || {_GRANT_ID} || '",' || $5::bigint || ',0,0,0]]'
FROM {_SERIES}
WHERE true {_PARAMS_USED}
"""
# Past reservation p (1-based) of wallet i: RESERVE at sequence 2p, COMMIT at 2p + 1.
_HISTORY = f"{_SERIES} CROSS JOIN LATERAL generate_series(1, {_PAIRS}) AS p"
_RESERVATION_ID = f"'rsv_' || {_ID_STEM} || lpad(to_hex(i * 64 + p), 16, '0')"
_RESERVED_AT = f"($4::bigint + p * {HISTORY_STEP_US})"
_COMMITTED_AT = f"($4::bigint + p * {HISTORY_STEP_US} + {HISTORY_STEP_US // 2})"
RESERVATIONS_SQL = f"""
INSERT INTO reservations (account_id, reservation_id, credit_type, amount, status, created_at_us,
                          expires_at_us, resolved_at_us, amount_committed, amount_released,
                          amount_expired, action, request_id, metadata_json, idempotency_key,
                          reserve_sequence, resolution_sequence)
SELECT {_ACCOUNT}, {_RESERVATION_ID}, 'default', 1, 'committed', {_RESERVED_AT},
       {_RESERVED_AT} + 300000000, {_COMMITTED_AT}, 1, 0, 0, '{SEED_ACTION}', '', '{{}}',
       'seed-' || p, 2 * p, 2 * p + 1
FROM {_HISTORY}
WHERE true {_PARAMS_USED}
"""
SLICES_SQL = f"""
INSERT INTO reservation_slices (account_id, reservation_id, grant_id, amount)
SELECT {_ACCOUNT}, {_RESERVATION_ID}, {_GRANT_ID}, 1 FROM {_HISTORY}
WHERE true {_PARAMS_USED}
"""
HISTORY_ENTRIES_SQL = f"""
INSERT INTO journal (account_id, credit_type, sequence, kind, amount, available_after,
                     reserved_after, grant_id, reservation_id, idempotency_key, principal, action,
                     request_id, created_at_us, grant_effects_json)
SELECT {_ACCOUNT}, 'default', 2 * p + e.commit, e.kind, -e.commit, $5::bigint - p,
       1 - e.commit, '', {_RESERVATION_ID}, CASE WHEN e.commit = 0 THEN 'seed-' || p ELSE '' END,
       '{SEED_PRINCIPAL}', '{SEED_ACTION}', '', {_RESERVED_AT} + e.commit * {HISTORY_STEP_US // 2},
       CASE WHEN e.commit = 0 THEN '[["' || {_GRANT_ID} || '",-1,1,0,0]]'
            ELSE '[["' || {_GRANT_ID} || '",0,-1,1,0]]' END
FROM {_HISTORY} CROSS JOIN (VALUES (0, 'reserve'), (1, 'commit')) AS e(commit, kind)
"""
NAIVE_WALLETS_SQL = f"""
INSERT INTO naive_wallets (account_id, credit_type, available, reserved)
SELECT {_ACCOUNT}, 'default', $5::bigint, 0 FROM {_SERIES}
WHERE $4::bigint IS NOT NULL {_PARAMS_USED}
"""


def account_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:0{ACCOUNT_DIGITS}d}"


async def _run(conn: asyncpg.Connection, sql: str, wallets: WalletRange) -> None:
    await conn.execute(
        sql,
        wallets.prefix,
        wallets.first,
        wallets.last,
        wallets.created_at_us,
        wallets.balance,
        wallets.history_pairs,
    )


async def seed_wallets(conn: asyncpg.Connection, wallets: WalletRange) -> None:
    """One transaction: accounts, wallets, grants, their GRANT entries, and any history."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = off")
        for sql in (ACCOUNTS_SQL, WALLETS_SQL, GRANTS_SQL, GRANT_ENTRIES_SQL):
            await _run(conn, sql, wallets)
        if wallets.history_pairs:
            for sql in (RESERVATIONS_SQL, SLICES_SQL, HISTORY_ENTRIES_SQL):
                await _run(conn, sql, wallets)


async def seed_parallel(database_url: str, wallets: WalletRange, parts: int) -> None:
    """Splits a large range over `parts` connections (one per core) loading at once."""
    step = -(-wallets.count // parts)
    chunks = [
        WalletRange(
            wallets.prefix,
            first,
            min(step, wallets.first + wallets.count - first),
            wallets.balance,
            wallets.created_at_us,
            wallets.history_pairs,
        )
        for first in range(wallets.first, wallets.first + wallets.count, step)
    ]

    async def load(chunk: WalletRange) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await seed_wallets(conn, chunk)
        finally:
            await conn.close()

    await asyncio.gather(*(load(chunk) for chunk in chunks))


async def create_naive_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(NAIVE_SCHEMA)


async def seed_naive(conn: asyncpg.Connection, wallets: WalletRange) -> None:
    await _run(conn, NAIVE_WALLETS_SQL, wallets)


async def analyze(conn: asyncpg.Connection) -> None:
    await conn.execute("VACUUM ANALYZE")


async def checkpoint(conn: asyncpg.Connection) -> bool:
    """Writes out what a bulk load dirtied, so that no checkpoint started by the load's WAL runs
    through the scenarios measured after it. False when the role may not (pg_checkpoint)."""
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True
