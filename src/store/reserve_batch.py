"""Reserve on Postgres, many requests per batch (group commit).

Concurrent Reserve calls queue here, and a batch settles them in two round trips whatever its
size, neither of them inside an open transaction:

1. one read of everything the decisions need, from one snapshot: the wallets (sequence and
   reserved total), their grants, the accounts' status, and which of the keys are taken;
2. one statement that writes every decision and commits on its own. It locks each wallet it
   changes only if the wallet is still at the sequence the read saw (compare and set) and no
   other transaction holds it (SKIP LOCKED) and its account is not locked, and writes that
   wallet's grants, reservations, journal entries and stored outcomes only if it got the lock.

When this process's batches wrote every wallet of the batch last, the read is skipped: the batch
decides on the copies they left (store/wallet_copies.py) and goes straight to the write, whose
compare and set checks them. Only a batch of successes is written that way (a refusal is stored
for good, so it is decided on a read); a copy that lost, a key stored already or a refusal sends
the batch to the read after all.

The compare and set is sound because every change to a wallet's grants advances the wallet's
sequence in the same transaction (every change writes a journal entry, ledger.py `_journal`
and the batches): a wallet at the sequence read has the grants read. One fsync covers the
batch, and a hot wallet is written once per batch instead of once per call.

A wallet that moved or was held meanwhile loses the compare and set, and its calls go to the
locking path: one transaction that claims the keys and locks the wallets (sorted: one lock order,
no deadlock between batches), reads their grants and status, and writes everything in one
multi-row statement, waiting for a held wallet as long as it must. A key taken meanwhile (the
same key sent twice at once) or a lock cycle fails the statement whole, and every call of the
batch goes to the locking path.

The decisions are the same as the one-call path in ledger.py, taken in arrival order on an
in-memory copy of each wallet: the same burn-down (`allocate`), the same journal entry, the same
stored outcome. Whatever a batch cannot decide goes back to that path: a key already stored (a
replay, or the same key twice in one batch) and every call of a batch that failed. That path
reads the stored outcome or claims the key afresh, so a batch that died before, during or after
its commit never doubles an effect.

A caller whose deadline passed before its turn is decided is left out: nothing of it is written
(on the locking path its claimed key is deleted in the same transaction), and the key stays free
for a retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs; connections are typed Any here

from store import codec
from store.batching import (
    JOURNAL_INSERT,
    RESERVATION_INSERT,
    AdmissionCall,
    Admitting,
    Batcher,
    Settled,
    Waiting,
    Written,
    columns,
)
from store.burndown import NO_SCHEDULED_CHANGE_US, Lot, allocate, is_live, next_liveness_change_us
from store.errors import AccountLocked, BusinessFailure, InsufficientCredits
from store.ids import new_id
from store.model import (
    AccountStatus,
    Caller,
    EntryKind,
    GrantEffect,
    JournalEntry,
    Reservation,
    ReservationResult,
    ReserveCommand,
)
from store.wallet_copies import WalletCopy

ReserveOutcome = ReservationResult | BusinessFailure

# ---- the batch: one read, one self-committing write ---------------------------------------------

# One snapshot: each wallet's sequence and reserved total with its grants as of that sequence,
# the accounts' status, and the keys already stored. No lock is taken.
#
# This statement and _GUARDED_WRITE_SQL run with generic plans (planned once per connection,
# store/batch_pool.py): planning them afresh cost more than running them. A generic plan is made
# once, whatever the tables held then, so every table is reached through a LATERAL subquery
# keyed by the batch's arrays: the array is always the outer side and each lookup an index
# probe, whether the table was empty or huge when the plan was made (OFFSET 0 keeps the planner
# from flattening the subquery back into a join whose order it would choose by size).
_SNAPSHOT_SQL = """
SELECT false AS is_key, t.a, t.c, acc.status, g.grant_id, g.priority, g.effective_at_us,
       g.expires_at_us, g.remaining, w.last_sequence, w.reserved
FROM unnest($1::text[], $2::text[]) AS t(a, c)
LEFT JOIN LATERAL (
    SELECT status FROM accounts WHERE account_id = t.a OFFSET 0
) AS acc ON true
LEFT JOIN LATERAL (
    SELECT last_sequence, reserved FROM wallets
    WHERE account_id = t.a AND credit_type = t.c OFFSET 0
) AS w ON true
LEFT JOIN LATERAL (
    SELECT grant_id, priority, effective_at_us, expires_at_us, remaining FROM grants
    WHERE account_id = t.a AND credit_type = t.c AND remaining > 0 OFFSET 0
) AS g ON true
UNION ALL
SELECT true, u.a, u.k, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM unnest($3::text[], $4::text[]) AS u(a, k)
JOIN LATERAL (
    SELECT 1 FROM idempotency_keys WHERE account_id = u.a AND idempotency_key = u.k OFFSET 0
) AS k ON true
"""

# Commits on its own. `locked` takes each changed wallet that is still at the sequence read
# ($3), whose account is not locked (a batch deciding on copies has not read the status) and
# that no one holds; FOR UPDATE rechecks the sequence on the newest row version, and
# SKIP LOCKED never waits, so the order of the locks does not matter. Everything else of a
# wallet is written only if `w` returned it. Outcomes of wallets the batch did not change
# (refusals only) need no lock: they were decided on a consistent snapshot. credits_assert
# (migration 0005) fails the statement, so nothing is written, if a grant the decisions spent
# was not where they read it. Generic plan: tables are reached as in _SNAPSHOT_SQL.
_GUARDED_WRITE_SQL = f"""
WITH
locked AS (
    SELECT x.a, x.c, d.seq, d.resv
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
         AS d(a, c, old, seq, resv)
    CROSS JOIN LATERAL (
        SELECT account_id AS a, credit_type AS c FROM wallets
        WHERE account_id = d.a AND credit_type = d.c AND last_sequence = d.old
          AND NOT EXISTS (
              SELECT 1 FROM accounts WHERE account_id = d.a AND status = 'locked')
        FOR UPDATE SKIP LOCKED
    ) AS x
),
w AS (
    UPDATE wallets SET last_sequence = l.seq, reserved = l.resv
    FROM locked l
    WHERE wallets.account_id = l.a AND wallets.credit_type = l.c
    RETURNING wallets.account_id AS a, wallets.credit_type AS c
),
g AS (
    UPDATE grants SET remaining = grants.remaining + d.dr, held = grants.held + d.dh
    FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[])
         AS d(a, c, gid, dr, dh)
    JOIN w ON w.a = d.a AND w.c = d.c
    WHERE grants.account_id = d.a AND grants.grant_id = d.gid
    RETURNING 1
),
r AS (
    {RESERVATION_INSERT}
    SELECT t.a, t.rid, t.c, t.amt, 'pending', $11, t.exp, NULL, 0, 0, 0, t.act, t.req, t.meta,
           t.k, t.seq, NULL
    FROM unnest($12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[], $17::text[],
                $18::text[], $19::text[], $20::text[], $21::bigint[])
         AS t(a, rid, c, amt, exp, act, req, meta, k, seq)
    JOIN w ON w.a = t.a AND w.c = t.c
    RETURNING 1
),
s AS (
    INSERT INTO reservation_slices (account_id, reservation_id, grant_id, amount)
    SELECT t.a, t.rid, t.gid, t.amt
    FROM unnest($22::text[], $23::text[], $24::text[], $25::text[], $26::bigint[])
         AS t(a, c, rid, gid, amt)
    JOIN w ON w.a = t.a AND w.c = t.c
    RETURNING 1
),
j AS (
    {JOURNAL_INSERT}
    SELECT t.a, t.c, t.seq, 'reserve', t.amt, t.avail, t.resv, '', t.rid, t.k, t.p, t.act,
           t.req, $11, t.fx
    FROM unnest($12::text[], $14::text[], $21::bigint[], $27::bigint[], $28::bigint[],
                $29::bigint[], $13::text[], $20::text[], $30::text[], $17::text[], $18::text[],
                $31::text[])
         AS t(a, c, seq, amt, avail, resv, rid, k, p, act, req, fx)
    JOIN w ON w.a = t.a AND w.c = t.c
    RETURNING 1
),
k AS (
    INSERT INTO idempotency_keys
        (account_id, idempotency_key, operation, request_json, outcome_json, created_at_us)
    SELECT t.a, t.k, 'reserve', t.r, t.o, $11
    FROM unnest($32::text[], $33::text[], $34::text[], $35::text[], $36::text[],
                $37::boolean[]) AS t(a, c, k, r, o, guarded)
    LEFT JOIN w ON w.a = t.a AND w.c = t.c
    WHERE NOT t.guarded OR w.a IS NOT NULL
    RETURNING 1
)
SELECT
    credits_assert(
        (SELECT count(*) FROM g) = (
            SELECT count(*) FROM unnest($6::text[], $7::text[]) AS e(a, c)
            JOIN w ON w.a = e.a AND w.c = e.c)
        AND (SELECT count(*) FROM j) = (SELECT count(*) FROM r),
        'a Reserve batch spent a grant that was not where it read it'),
    (SELECT array_agg(a) FROM w), (SELECT array_agg(c) FROM w),
    (SELECT count(*) FROM r), (SELECT count(*) FROM s), (SELECT count(*) FROM k)
"""

# ---- the locking path: what the batch could not settle --------------------------------------

# Claims the keys and locks the wallets in one round trip. Wallets are locked sorted (LockRows
# runs above the sort), so batches never deadlock on wallets. The two parts of one statement run
# in no set order, so a batch and another transaction that wait on each other's key and wallet
# (the same key sent twice at once, racing) can deadlock: Postgres breaks it, the batch rolls
# back whole and its calls go one by one.
_CLAIM_AND_LOCK_SQL = """
WITH claimed AS (
    INSERT INTO idempotency_keys
        (account_id, idempotency_key, operation, request_json, outcome_json, created_at_us)
    SELECT a, k, 'reserve', r, '', $4
    FROM unnest($1::text[], $2::text[], $3::text[]) AS t(a, k, r)
    ON CONFLICT (account_id, idempotency_key) DO NOTHING
    RETURNING account_id, idempotency_key
), locked AS (
    SELECT w.account_id, w.credit_type, w.last_sequence, w.reserved
    FROM wallets w
    JOIN unnest($5::text[], $6::text[]) AS t(a, c) ON w.account_id = t.a AND w.credit_type = t.c
    ORDER BY w.account_id, w.credit_type
    FOR UPDATE OF w
)
SELECT true AS is_key, account_id, idempotency_key AS name, 0::bigint, 0::bigint FROM claimed
UNION ALL
SELECT false, account_id, credit_type, last_sequence, reserved FROM locked
"""

# A separate statement after the locks: it reads the grants as the lock holders left them.
_READ_SQL = """
SELECT t.a, t.c, acc.status, g.grant_id, g.priority, g.effective_at_us, g.expires_at_us,
       g.remaining
FROM unnest($1::text[], $2::text[]) AS t(a, c)
LEFT JOIN accounts acc ON acc.account_id = t.a
LEFT JOIN grants g ON g.account_id = t.a AND g.credit_type = t.c AND g.remaining > 0
"""

_WRITE_SQL = f"""
WITH
g AS (
    UPDATE grants SET remaining = grants.remaining + d.dr, held = grants.held + d.dh
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS d(a, gid, dr, dh)
    WHERE grants.account_id = d.a AND grants.grant_id = d.gid
    RETURNING 1
),
r AS (
    {RESERVATION_INSERT}
    SELECT a, rid, c, amt, 'pending', $5, exp, NULL, 0, 0, 0, act, req, meta, k, seq, NULL
    FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[],
                $12::text[], $13::text[], $14::text[], $15::bigint[])
         AS t(a, rid, c, amt, exp, act, req, meta, k, seq)
    RETURNING 1
),
s AS (
    INSERT INTO reservation_slices (account_id, reservation_id, grant_id, amount)
    SELECT * FROM unnest($16::text[], $17::text[], $18::text[], $19::bigint[])
    RETURNING 1
),
j AS (
    {JOURNAL_INSERT}
    SELECT a, c, seq, 'reserve', amt, avail, resv, '', rid, k, p, act, req, $5, fx
    FROM unnest($6::text[], $8::text[], $15::bigint[], $33::bigint[], $20::bigint[],
                $21::bigint[], $7::text[], $14::text[], $22::text[], $11::text[], $12::text[],
                $23::text[])
         AS t(a, c, seq, amt, avail, resv, rid, k, p, act, req, fx)
    RETURNING 1
),
w AS (
    UPDATE wallets SET last_sequence = d.seq, reserved = d.resv
    FROM unnest($24::text[], $25::text[], $26::bigint[], $27::bigint[]) AS d(a, c, seq, resv)
    WHERE wallets.account_id = d.a AND wallets.credit_type = d.c
    RETURNING 1
),
k AS (
    UPDATE idempotency_keys SET outcome_json = d.o
    FROM unnest($28::text[], $29::text[], $30::text[]) AS d(a, k, o)
    WHERE idempotency_keys.account_id = d.a AND idempotency_keys.idempotency_key = d.k
    RETURNING 1
),
x AS (
    DELETE FROM idempotency_keys
    USING unnest($31::text[], $32::text[]) AS d(a, k)
    WHERE idempotency_keys.account_id = d.a AND idempotency_keys.idempotency_key = d.k
    RETURNING 1
)
SELECT (SELECT count(*) FROM g), (SELECT count(*) FROM r), (SELECT count(*) FROM s),
       (SELECT count(*) FROM j), (SELECT count(*) FROM w), (SELECT count(*) FROM k),
       (SELECT count(*) FROM x)
"""


@dataclass(frozen=True)
class ReserveCall:
    cmd: ReserveCommand
    caller: Caller
    request_json: str
    ttl_seconds: int


_Request = Waiting[ReserveCall, ReserveOutcome]


@dataclass
class _Wallet:
    """A locked wallet as this batch's decisions leave it."""

    last_sequence: int
    reserved: int
    status: AccountStatus
    lots: dict[str, Lot]
    next_change_us: int
    # False when the wallet has no row yet (never granted): nothing to spend or lock.
    exists: bool = True
    changed: bool = False
    # The sequence it was read at: the compare-and-set's expected value.
    first_sequence: int = 0

    def __post_init__(self) -> None:
        self.first_sequence = self.last_sequence


@dataclass
class _Writes:
    """The rows of one batch (the statements unnest them column by column)."""

    # (account, credit type, grant) -> [remaining delta, held delta]
    grant_deltas: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    reservations: list[tuple[Any, ...]] = field(default_factory=list)
    # (account, credit type, reservation, grant, amount)
    slices: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    # (account, credit type, key, request JSON, outcome JSON)
    outcomes: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    unclaimed: list[tuple[str, str]] = field(default_factory=list)

    def add_outcome(self, request: _Request, outcome: ReserveOutcome) -> None:
        cmd = request.request.cmd
        self.outcomes.append(
            (
                cmd.account_id,
                cmd.credit_type,
                cmd.idempotency_key,
                request.request.request_json,
                codec.outcome_to_json(outcome),
            )
        )


class ReserveBatcher(Batcher[ReserveCall, ReserveOutcome]):
    async def reserve(
        self, cmd: ReserveCommand, caller: Caller, request_json: str, ttl_seconds: int
    ) -> ReserveOutcome | None:
        """The outcome decided in a batch, or None: take the one-call path."""
        return await self.submit(ReserveCall(cmd, caller, request_json, ttl_seconds))

    def admission_call(self, request: ReserveCall) -> AdmissionCall:
        cmd = request.cmd
        return AdmissionCall(request.caller.principal, "Reserve", cmd.account_id, cmd.amount)

    async def settle(
        self,
        batch: list[_Request],
        admitting: Admitting[ReserveCall, ReserveOutcome] | None,
        settled: Settled[ReserveOutcome],
    ) -> None:
        requests = _first_per_key(batch)
        async with self.connections.generic() as conn:
            copies = self.copies.take(_wallet_keys(requests), self.clock.now_us())
            if copies is None:
                # The read runs beside the rate check; both are needed before deciding.
                if admitting is not None:
                    admitting.start()
                state = await _read_snapshot(conn, requests)
                admitted = {w.arrival for w in await self.admitted(batch, admitting)}
            else:
                # No read to overlap: the rate check runs in this task, then the write.
                admitted = {w.arrival for w in await self.admitted(batch, admitting)}
                requests = await self._write_from_copies(
                    conn, [r for r in requests if r.arrival in admitted], copies, settled
                )
                if not requests:
                    self.leave_flight()
                    return
                state = await _read_snapshot(conn, requests)
            # The decision instant: after the read, whose snapshot it decides on.
            now_us = self.clock.now_us()
            wallets, stored = _load_snapshot(state, now_us)
            mine = [
                r
                for r in requests
                if r.arrival in admitted
                and (r.request.cmd.account_id, r.request.cmd.idempotency_key) not in stored
            ]
            try:
                lost = await self._decide_and_write_guarded(conn, mine, wallets, now_us, settled)
            except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
                # A key taken since the read, or a lock cycle with another transaction: the
                # statement wrote nothing.
                self.counters.lost_compare_and_set += 1
                lost = mine
        if not lost:
            self.leave_flight()
            return
        # The locking path, in flight until its COMMIT: a batch waiting here on a held wallet
        # holds a connection, and at most batches_in_flight_max do.
        decided: dict[int, ReserveOutcome] = {}
        async with self.connections.transaction() as conn:
            written = await self._decide_and_write(conn, lost, decided)
            self.leave_flight()
        settled.add(decided, written)

    async def _write_from_copies(
        self,
        conn: Any,
        requests: list[_Request],
        copies: dict[tuple[str, str], WalletCopy],
        settled: Settled[ReserveOutcome],
    ) -> list[_Request]:
        """Decides `requests` on this process's copies of their wallets and writes them like a
        batch that read (one round trip instead of two); adds what it committed to `settled`
        and returns the requests it did not settle, for the read path. Only a batch in which
        every call succeeds is written: a refusal stored for good must be decided on what
        the database holds, not on a copy."""
        now_us = self.clock.now_us()
        if any(now_us >= copy.valid_until_us for copy in copies.values()):
            return requests
        wallets = {
            key: _Wallet(
                copy.last_sequence,
                copy.reserved,
                AccountStatus.ACTIVE,
                {lot.grant_id: lot for lot in copy.lots},
                copy.valid_until_us,
            )
            for key, copy in copies.items()
        }
        try:
            lost = await self._decide_and_write_guarded(
                conn, requests, wallets, now_us, settled, from_copies=True
            )
        except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
            # A key stored already (a replay, unseen without the read), or a lock cycle with
            # another transaction: the statement wrote nothing.
            lost = requests
        self.copies.decided += 1
        if lost:
            self.copies.reread += 1
        return lost

    async def decide(
        self, conn: Any, batch: list[_Request], decided: dict[int, ReserveOutcome]
    ) -> Written:
        """The locking path alone, for a whole batch (settle uses it for what it could not
        write without locks)."""
        return await self._decide_and_write(conn, _first_per_key(batch), decided)

    async def _decide_and_write_guarded(
        self,
        conn: Any,
        requests: list[_Request],
        wallets: dict[tuple[str, str], _Wallet],
        now_us: int,
        settled: Settled[ReserveOutcome],
        *,
        from_copies: bool = False,
    ) -> list[_Request]:
        """Decides `requests` on the snapshot read (or on copies) and writes them in one
        statement that commits; adds what it committed to `settled` and returns the requests of
        the wallets that moved or were held since the read (nothing of theirs was written).
        `from_copies`: a refusal among the decisions leaves everything unwritten and returned
        (a refusal is stored for good, so it is decided on what the database holds)."""
        writes = _Writes()
        decided = _decide_in_order(requests, wallets, now_us, writes, claimed=False)
        if from_copies and not all(
            isinstance(outcome, ReservationResult) for outcome in decided.values()
        ):
            return requests
        if not writes.outcomes:
            return []
        changed = _changed(wallets)
        written = await _write_guarded(conn, now_us, writes, changed)
        lost_wallets = changed.keys() - written
        if lost_wallets and not from_copies:  # those go to the read path, counted there
            self.counters.lost_compare_and_set += 1
        lost = []
        for request in requests:
            cmd = request.request.cmd
            if (cmd.account_id, cmd.credit_type) in lost_wallets:
                decided.pop(request.arrival, None)
                lost.append(request)
        settled.add(decided, _written({k: changed[k] for k in written}, now_us))
        return lost

    async def _decide_and_write(
        self, conn: Any, requests: list[_Request], decided: dict[int, ReserveOutcome]
    ) -> Written:
        # One lock order for keys across batches and replicas: sorted.
        requests.sort(key=lambda r: (r.request.cmd.account_id, r.request.cmd.idempotency_key))
        wallet_keys = _wallet_keys(requests)
        accounts_col = [a for a, _ in wallet_keys]
        types_col = [c for _, c in wallet_keys]
        claimed: set[tuple[str, str]] = set()
        locked: dict[tuple[str, str], tuple[int, int]] = {}
        for row in await conn.fetch(
            _CLAIM_AND_LOCK_SQL,
            [r.request.cmd.account_id for r in requests],
            [r.request.cmd.idempotency_key for r in requests],
            [r.request.request_json for r in requests],
            self.clock.now_us(),
            accounts_col,
            types_col,
        ):
            if row[0]:
                claimed.add((row[1], row[2]))
            else:
                locked[(row[1], row[2])] = (row[3], row[4])
        mine = [
            r
            for r in requests
            if (r.request.cmd.account_id, r.request.cmd.idempotency_key) in claimed
        ]
        if not mine:
            return Written()
        # The decision instant: after the locks, as on the one-call path.
        now_us = self.clock.now_us()
        wallets = _load_wallets(
            await conn.fetch(_READ_SQL, accounts_col, types_col), locked, now_us
        )
        writes = _Writes()
        decided.update(_decide_in_order(mine, wallets, now_us, writes, claimed=True))
        changed = _changed(wallets)
        wallet_rows = [(a, c, w.last_sequence, w.reserved) for (a, c), w in changed.items()]
        await _write(conn, now_us, writes, wallet_rows)
        return _written(changed, now_us)


def _wallet_keys(requests: list[_Request]) -> list[tuple[str, str]]:
    return sorted({(r.request.cmd.account_id, r.request.cmd.credit_type) for r in requests})


async def _read_snapshot(conn: Any, requests: list[_Request]) -> Sequence[Any]:
    """_SNAPSHOT_SQL for the wallets and keys of `requests`."""
    wallet_keys = _wallet_keys(requests)
    rows: Sequence[Any] = await conn.fetch(
        _SNAPSHOT_SQL,
        [a for a, _ in wallet_keys],
        [c for _, c in wallet_keys],
        [r.request.cmd.account_id for r in requests],
        [r.request.cmd.idempotency_key for r in requests],
    )
    return rows


def _decide_in_order(
    requests: list[_Request],
    wallets: dict[tuple[str, str], _Wallet],
    now_us: int,
    writes: _Writes,
    *,
    claimed: bool,
) -> dict[int, ReserveOutcome]:
    """Decides `requests` in arrival order on the in-memory wallets, adding their rows to
    `writes`; their outcomes by arrival. A caller whose deadline passed is left out, with
    nothing of it written: on the locking path (`claimed`) its key is deleted again."""
    decided: dict[int, ReserveOutcome] = {}
    for request in sorted(requests, key=lambda r: r.arrival):
        cmd = request.request.cmd
        if request.future.done():
            if claimed:
                writes.unclaimed.append((cmd.account_id, cmd.idempotency_key))
            continue
        outcome = _decide(request, wallets.get((cmd.account_id, cmd.credit_type)), now_us, writes)
        decided[request.arrival] = outcome
        writes.add_outcome(request, outcome)
    return decided


def _changed(wallets: dict[tuple[str, str], _Wallet]) -> dict[tuple[str, str], _Wallet]:
    """The wallets the decisions changed, each checked before it is written."""
    changed = {key: wallet for key, wallet in wallets.items() if wallet.changed}
    for (account_id, credit_type), wallet in changed.items():
        assert wallet.reserved >= 0, f"wallet {account_id}/{credit_type} reserved < 0"
    return changed


def _written(wallets: dict[tuple[str, str], _Wallet], now_us: int) -> Written:
    """The copies and snapshots of wallets a batch changed, to keep and publish once they are
    committed. Their validity is the read's, conservative as on the one-call path: reserving can
    only make an expiry irrelevant."""
    return Written.of(
        (
            (key, WalletCopy(w.last_sequence, w.reserved, w.next_change_us, list(w.lots.values())))
            for key, w in wallets.items()
        ),
        now_us,
    )


def _first_per_key(batch: list[_Request]) -> list[_Request]:
    """The same key twice in one batch: the first decides, the others replay it after (the
    one-call path reads its stored outcome)."""
    unique: dict[tuple[str, str], _Request] = {}
    for waiting in batch:
        call = waiting.request
        unique.setdefault((call.cmd.account_id, call.cmd.idempotency_key), waiting)
    return list(unique.values())


def _load_snapshot(
    state: Sequence[Any], now_us: int
) -> tuple[dict[tuple[str, str], _Wallet], set[tuple[str, str]]]:
    """_SNAPSHOT_SQL's rows as wallets, and the (account, key) pairs already stored."""
    read_rows = []
    versions: dict[tuple[str, str], tuple[int, int]] = {}
    stored: set[tuple[str, str]] = set()
    for row in state:
        if row[0]:
            stored.add((row[1], row[2]))
            continue
        read_rows.append(row[1:9])
        if row[9] is not None:
            versions[(row[1], row[2])] = (row[9], row[10])
    return _load_wallets(read_rows, versions, now_us), stored


def _load_wallets(
    read_rows: Sequence[Any], locked: dict[tuple[str, str], tuple[int, int]], now_us: int
) -> dict[tuple[str, str], _Wallet]:
    all_lots: dict[tuple[str, str], list[Lot]] = {}
    statuses: dict[str, AccountStatus] = {}
    for row in read_rows:
        account_id, credit_type, status = row[0], row[1], row[2]
        statuses[account_id] = AccountStatus.ACTIVE if status is None else AccountStatus(status)
        lots = all_lots.setdefault((account_id, credit_type), [])
        if row[3] is not None:
            lots.append(Lot(row[3], row[4], row[5], row[6], row[7]))
    wallets: dict[tuple[str, str], _Wallet] = {}
    for key, lots in all_lots.items():
        status = statuses[key[0]]
        if key not in locked:  # no wallet row: nothing to spend, but the status still answers
            wallets[key] = _Wallet(0, 0, status, {}, NO_SCHEDULED_CHANGE_US, exists=False)
            continue
        last_sequence, reserved = locked[key]
        live = {
            lot.grant_id: lot
            for lot in lots
            if is_live(lot.effective_at_us, lot.expires_at_us, now_us)
        }
        wallets[key] = _Wallet(
            last_sequence, reserved, status, live, next_liveness_change_us(lots, now_us)
        )
    return wallets


def _decide(
    request: _Request, wallet: _Wallet | None, now_us: int, writes: _Writes
) -> ReserveOutcome:
    cmd, caller = request.request.cmd, request.request.caller
    assert wallet is not None, "every decided request's wallet was read"
    if wallet.status is AccountStatus.LOCKED:
        return AccountLocked(cmd.account_id)
    available = sum(lot.amount for lot in wallet.lots.values())
    slices = allocate(wallet.lots.values(), cmd.amount) if available >= cmd.amount else None
    if not wallet.exists or slices is None:
        return InsufficientCredits(cmd.account_id, cmd.credit_type, cmd.amount, available)

    for s in slices:
        lot = wallet.lots[s.grant_id]
        if lot.amount == s.amount:
            del wallet.lots[s.grant_id]
        else:
            wallet.lots[s.grant_id] = replace(lot, amount=lot.amount - s.amount)
        deltas = writes.grant_deltas.setdefault(
            (cmd.account_id, cmd.credit_type, s.grant_id), [0, 0]
        )
        deltas[0] -= s.amount
        deltas[1] += s.amount
    wallet.last_sequence += 1
    wallet.reserved += cmd.amount
    wallet.changed = True
    effects = tuple(
        GrantEffect(s.grant_id, remaining_delta=-s.amount, held_delta=s.amount) for s in slices
    )
    reservation = Reservation.pending(
        new_id("rsv"), cmd, caller, now_us, request.request.ttl_seconds, slices
    )
    entry = JournalEntry(
        account_id=cmd.account_id,
        credit_type=cmd.credit_type,
        sequence=wallet.last_sequence,
        kind=EntryKind.RESERVE,
        amount=sum(e.unexpired_delta for e in effects),
        available_after=available - cmd.amount,
        reserved_after=wallet.reserved,
        grant_id="",
        reservation_id=reservation.reservation_id,
        idempotency_key=cmd.idempotency_key,
        principal=caller.principal,
        action=caller.action,
        request_id=caller.request_id,
        created_at_us=now_us,
        grant_effects=effects,
    )
    assert entry.available_after >= 0 and entry.reserved_after >= 0, entry
    writes.reservations.append(
        (
            cmd.account_id,
            reservation.reservation_id,
            cmd.credit_type,
            cmd.amount,
            reservation.expires_at_us,
            caller.action,
            caller.request_id,
            codec.metadata_to_json(reservation.metadata),
            cmd.idempotency_key,
            entry.sequence,
            entry.available_after,
            entry.reserved_after,
            caller.principal,
            codec.effects_to_json(effects),
            entry.amount,
        )
    )
    writes.slices.extend(
        (cmd.account_id, cmd.credit_type, reservation.reservation_id, s.grant_id, s.amount)
        for s in slices
    )
    return ReservationResult(reservation, entry)


async def _write_guarded(
    conn: Any, now_us: int, writes: _Writes, changed: dict[tuple[str, str], _Wallet]
) -> set[tuple[str, str]]:
    """Runs _GUARDED_WRITE_SQL; the wallets it changed (the others it left alone)."""
    wallet_rows = [
        (a, c, w.first_sequence, w.last_sequence, w.reserved) for (a, c), w in changed.items()
    ]
    grant_rows = [(a, c, g, d[0], d[1]) for (a, c, g), d in writes.grant_deltas.items()]
    # Per reservation: its 10 row columns ($12-$21), then its entry's amount, available,
    # reserved, principal and effects ($27-$31).
    reservation_columns = columns(writes.reservations, 15)
    row = await conn.fetchrow(
        _GUARDED_WRITE_SQL,
        *columns(wallet_rows, 5),
        *columns(grant_rows, 5),
        now_us,
        *reservation_columns[:10],
        *columns(writes.slices, 5),
        reservation_columns[14],
        *reservation_columns[10:14],
        *columns(writes.outcomes, 5),
        [(a, c) in changed for a, c, *_ in writes.outcomes],
    )
    written = set(zip(row[1] or (), row[2] or (), strict=True))
    expected = (
        sum(1 for r in writes.reservations if (r[0], r[2]) in written),
        sum(1 for r in writes.slices if (r[0], r[1]) in written),
        sum(1 for o in writes.outcomes if (o[0], o[1]) in written or (o[0], o[1]) not in changed),
    )
    # Committed already, so this cannot roll back; it stops the batch from answering anything
    # but what is stored (its calls then replay their stored outcomes one by one).
    assert tuple(row[3:]) == expected, f"reserve batch wrote {tuple(row[3:])}, meant {expected}"
    return written


async def _write(
    conn: Any,
    now_us: int,
    writes: _Writes,
    wallet_rows: Sequence[tuple[str, str, int, int]],
) -> None:
    grant_rows = [(a, g, d[0], d[1]) for (a, _, g), d in writes.grant_deltas.items()]
    slice_rows = [(a, rid, g, amount) for a, _, rid, g, amount in writes.slices]
    outcome_rows = [(a, k, o) for a, _, k, _, o in writes.outcomes]
    # Per reservation: its 10 row columns ($6-$15), then its entry's available, reserved,
    # principal and effects ($20-$23), and the entry's amount ($33).
    reservation_columns = columns(writes.reservations, 15)
    counts = await conn.fetchrow(
        _WRITE_SQL,
        *columns(grant_rows, 4),
        now_us,
        *reservation_columns[:10],
        *columns(slice_rows, 4),
        *reservation_columns[10:14],
        *columns(wallet_rows, 4),
        *columns(outcome_rows, 3),
        *columns(writes.unclaimed, 2),
        reservation_columns[14],
    )
    expected = (
        len(grant_rows),
        len(writes.reservations),
        len(slice_rows),
        len(writes.reservations),  # one journal entry per reservation
        len(wallet_rows),
        len(outcome_rows),
        len(writes.unclaimed),
    )
    # Any difference is a bug: raising rolls the whole batch back.
    assert tuple(counts) == expected, f"reserve batch wrote {tuple(counts)}, meant {expected}"
