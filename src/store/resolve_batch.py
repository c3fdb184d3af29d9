"""Commit and Release on Postgres, many per transaction (group commit, store/batching.py).

A batch is six round trips whatever its size: BEGIN, lock the reservations' wallets (sorted),
read the reservations with their slices, read the wallets' lots, write everything in one
multi-row statement, COMMIT.

The batch settles only the plain case: a pending reservation, before its TTL, committed for at
most what it holds (or released). Everything else goes back to the one-call path in ledger.py,
which has the one answer for it: a reservation not found, a repeated Commit or Release (the
stored result, or a conflict naming the status), a TTL that has passed (the hold expires there
and then), an amount above the hold. The decisions are the one-call path's `_settle`, taken in
arrival order on an in-memory copy of each wallet: the same burn-down (`consume`), the same
journal entry, the same snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from store import codec
from store.batching import JOURNAL_INSERT, AdmissionCall, Batcher, Waiting, Written, columns
from store.burndown import Lot, consume, is_live
from store.model import (
    Caller,
    EntryKind,
    GrantEffect,
    JournalEntry,
    ReservationResult,
    ReservationStatus,
    Slice,
)
from store.rows import reservation_from_row
from store.wallet_copies import WalletCopy, copy_of

Resolution = Literal["commit", "release"]

# Locks the wallets of the named reservations, sorted (LockRows runs above the sort).
_LOCK_SQL = """
SELECT w.account_id, w.credit_type, w.last_sequence, w.reserved
FROM wallets w
JOIN (
    SELECT DISTINCT r.account_id, r.credit_type
    FROM reservations r
    JOIN unnest($1::text[], $2::text[]) AS t(a, rid)
      ON r.account_id = t.a AND r.reservation_id = t.rid
) x ON w.account_id = x.account_id AND w.credit_type = x.credit_type
ORDER BY w.account_id, w.credit_type
FOR UPDATE OF w
"""

# After the locks: the reservations as their lock holders left them, one row per slice, with
# each slice's grant (its burn-down place and expiry).
_RESERVATIONS_SQL = """
SELECT r.*, s.grant_id AS slice_grant_id, s.amount AS slice_amount, g.priority AS g_priority,
       g.effective_at_us AS g_effective_at_us, g.expires_at_us AS g_expires_at_us
FROM reservations r
JOIN unnest($1::text[], $2::text[]) AS t(a, rid)
  ON r.account_id = t.a AND r.reservation_id = t.rid
JOIN reservation_slices s ON s.account_id = r.account_id AND s.reservation_id = r.reservation_id
JOIN grants g ON g.account_id = s.account_id AND g.grant_id = s.grant_id
"""

# Every lot of the locked wallets: what is available after each change, and when it next
# changes with time alone.
_LOTS_SQL = """
SELECT g.account_id, g.credit_type, g.grant_id, g.priority, g.effective_at_us, g.expires_at_us,
       g.remaining
FROM grants g
JOIN unnest($1::text[], $2::text[]) AS t(a, c) ON g.account_id = t.a AND g.credit_type = t.c
WHERE g.remaining > 0
"""

# `coalesce(status, '')` (status is never NULL) keeps the hold sweeper's partial index (`WHERE
# status = 'pending'`) out of the planner's reach: with statistics that saw few pending
# reservations it estimated one row there and scanned every pending reservation per batch (60
# ms at 23,000) instead of looking each up by its key. ledger.py's pending_guard does the same.
_WRITE_SQL = f"""
WITH
g AS (
    UPDATE grants SET remaining = grants.remaining + d.dr, held = grants.held + d.dh,
                      consumed = grants.consumed + d.dc, expired = grants.expired + d.de
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
         AS d(a, gid, dr, dh, dc, de)
    WHERE grants.account_id = d.a AND grants.grant_id = d.gid
    RETURNING 1
),
r AS (
    UPDATE reservations SET status = d.st, resolved_at_us = $7, amount_committed = d.ac,
                            amount_released = d.ar, amount_expired = 0, resolution_sequence = d.seq
    FROM unnest($8::text[], $9::text[], $10::text[], $11::bigint[], $12::bigint[], $13::bigint[])
         AS d(a, rid, st, ac, ar, seq)
    WHERE reservations.account_id = d.a AND reservations.reservation_id = d.rid
      AND coalesce(reservations.status, '') = 'pending'
    RETURNING 1
),
j AS (
    {JOURNAL_INSERT}
    SELECT a, c, seq, kind, amt, avail, resv, '', rid, '', p, act, req, $7, fx
    FROM unnest($14::text[], $15::text[], $16::bigint[], $17::text[], $18::bigint[],
                $19::bigint[], $20::bigint[], $21::text[], $22::text[], $23::text[],
                $24::text[], $25::text[])
         AS t(a, c, seq, kind, amt, avail, resv, rid, p, act, req, fx)
    RETURNING 1
),
w AS (
    UPDATE wallets SET last_sequence = d.seq, reserved = d.resv
    FROM unnest($26::text[], $27::text[], $28::bigint[], $29::bigint[]) AS d(a, c, seq, resv)
    WHERE wallets.account_id = d.a AND wallets.credit_type = d.c
    RETURNING 1
)
SELECT (SELECT count(*) FROM g), (SELECT count(*) FROM r), (SELECT count(*) FROM j),
       (SELECT count(*) FROM w)
"""


@dataclass(frozen=True)
class ResolveCall:
    account_id: str
    reservation_id: str
    resolution: Resolution
    # Commit only: how much to charge (None: all of the hold).
    amount: int | None
    caller: Caller


_Call = Waiting[ResolveCall, ReservationResult]


@dataclass
class _Wallet:
    """A locked wallet as this batch's decisions leave it."""

    last_sequence: int
    reserved: int
    # Every grant with credits remaining, live or not yet, by grant id.
    lots: dict[str, Lot]
    changed: bool = False


@dataclass
class _Writes:
    grant_deltas: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    reservations: list[tuple[str, str, str, int, int, int]] = field(default_factory=list)
    entries: list[tuple[Any, ...]] = field(default_factory=list)


class ResolveBatcher(Batcher[ResolveCall, ReservationResult]):
    async def resolve(
        self,
        account_id: str,
        reservation_id: str,
        resolution: Resolution,
        amount: int | None,
        caller: Caller,
    ) -> ReservationResult | None:
        """The result decided in a batch, or None: take the one-call path."""
        return await self.submit(
            ResolveCall(account_id, reservation_id, resolution, amount, caller)
        )

    def admission_call(self, request: ResolveCall) -> AdmissionCall:
        method = "Commit" if request.resolution == "commit" else "Release"
        amount = 0 if request.amount is None else request.amount
        return AdmissionCall(request.caller.principal, method, request.account_id, amount)

    async def decide(
        self, conn: Any, batch: list[_Call], decided: dict[int, ReservationResult]
    ) -> Written:
        # One call per reservation: the first decides, any other goes the one-call path.
        unique: dict[tuple[str, str], _Call] = {}
        for waiting in batch:
            key = (waiting.request.account_id, waiting.request.reservation_id)
            unique.setdefault(key, waiting)
        calls = list(unique.values())
        asked = ([c.request.account_id for c in calls], [c.request.reservation_id for c in calls])
        locked = {(r[0], r[1]): (r[2], r[3]) for r in await conn.fetch(_LOCK_SQL, *asked)}
        if not locked:
            return Written()
        now_us = self.clock.now_us()  # the decision instant: after the locks
        found = _reservations(await conn.fetch(_RESERVATIONS_SQL, *asked))
        wallet_keys = sorted(locked)
        wallets = {key: _Wallet(*locked[key], lots={}) for key in wallet_keys}
        for row in await conn.fetch(
            _LOTS_SQL, [a for a, _ in wallet_keys], [c for _, c in wallet_keys]
        ):
            wallets[(row[0], row[1])].lots[row[2]] = Lot(row[2], row[3], row[4], row[5], row[6])

        writes = _Writes()
        for waiting in sorted(calls, key=lambda c: c.arrival):
            call = waiting.request
            held = found.get((call.account_id, call.reservation_id))
            if waiting.future.done() or held is None:
                continue  # given up, or not found: nothing to do here
            reservation_row, slice_lots = held
            wallet = wallets.get((call.account_id, reservation_row["credit_type"]))
            if wallet is None or not _plain(call, reservation_row, now_us):
                continue  # the one-call path has the one answer for it
            decided[waiting.arrival] = _settle(
                call, reservation_row, slice_lots, wallet, now_us, writes
            )
        wallet_rows: list[tuple[str, str, int, int]] = []
        # Published, and kept for the next Reserve batch on the wallet here to decide on.
        copies: list[tuple[tuple[str, str], WalletCopy]] = []
        for (account_id, credit_type), wallet in wallets.items():
            if wallet.changed:
                assert wallet.reserved >= 0, f"wallet {account_id}/{credit_type} reserved < 0"
                wallet_rows.append((account_id, credit_type, wallet.last_sequence, wallet.reserved))
                copy = copy_of(wallet.last_sequence, wallet.reserved, wallet.lots.values(), now_us)
                copies.append(((account_id, credit_type), copy))
        if wallet_rows:
            await _write(conn, now_us, writes, wallet_rows)
        return Written.of(copies, now_us)


def _reservations(rows: Sequence[Any]) -> dict[tuple[str, str], tuple[Any, list[Lot]]]:
    """Reservation rows and, for each slice, its grant as a Lot holding the slice's amount."""
    found: dict[tuple[str, str], tuple[Any, list[Lot]]] = {}
    for row in rows:
        _, slice_lots = found.setdefault((row["account_id"], row["reservation_id"]), (row, []))
        slice_lots.append(
            Lot(
                row["slice_grant_id"],
                row["g_priority"],
                row["g_effective_at_us"],
                row["g_expires_at_us"],
                row["slice_amount"],
            )
        )
    return found


def _plain(call: ResolveCall, row: Any, now_us: int) -> bool:
    return (
        row["status"] == ReservationStatus.PENDING.value
        and now_us < row["expires_at_us"]
        and (call.amount is None or call.amount <= row["amount"])
    )


def _settle(
    call: ResolveCall,
    row: Any,
    slice_lots: list[Lot],
    wallet: _Wallet,
    now_us: int,
    writes: _Writes,
) -> ReservationResult:
    """ledger.Ledger._settle for a pending hold before its TTL, on the in-memory wallet."""
    amount = int(row["amount"])
    consumed_total = (
        (amount if call.amount is None else call.amount) if call.resolution == "commit" else 0
    )
    expires = {lot.grant_id: lot.expires_at_us for lot in slice_lots}
    by_grant = {lot.grant_id: lot for lot in slice_lots}
    effects: list[GrantEffect] = []
    for outcome in consume(slice_lots, consumed_total):
        expires_at_us = expires[outcome.grant_id]
        grant_expired = expires_at_us is not None and now_us >= expires_at_us
        effect = GrantEffect(
            outcome.grant_id,
            remaining_delta=0 if grant_expired else outcome.returned,
            held_delta=-(outcome.consumed + outcome.returned),
            consumed_delta=outcome.consumed,
            expired_delta=outcome.returned if grant_expired else 0,
        )
        effects.append(effect)
        deltas = writes.grant_deltas.setdefault((call.account_id, outcome.grant_id), [0, 0, 0, 0])
        for i, delta in enumerate(
            (effect.remaining_delta, effect.held_delta, effect.consumed_delta, effect.expired_delta)
        ):
            deltas[i] += delta
        if effect.remaining_delta:
            lot = wallet.lots.get(outcome.grant_id) or replace(by_grant[outcome.grant_id], amount=0)
            wallet.lots[outcome.grant_id] = replace(lot, amount=lot.amount + effect.remaining_delta)

    status, kind = (
        (ReservationStatus.COMMITTED, EntryKind.COMMIT)
        if call.resolution == "commit"
        else (ReservationStatus.RELEASED, EntryKind.RELEASE)
    )
    wallet.last_sequence += 1
    wallet.reserved -= amount
    wallet.changed = True
    resolved = replace(
        reservation_from_row(row, [Slice(lot.grant_id, lot.amount) for lot in slice_lots]),
        status=status,
        resolved_at_us=now_us,
        amount_committed=consumed_total,
        amount_released=amount - consumed_total,
        amount_expired=0,
    )
    # Commit and Release carry no labels of their own: the journal keeps the reservation's.
    caller = replace(
        call.caller,
        action=call.caller.action or resolved.action,
        request_id=call.caller.request_id or resolved.request_id,
    )
    entry = JournalEntry(
        account_id=call.account_id,
        credit_type=resolved.credit_type,
        sequence=wallet.last_sequence,
        kind=kind,
        amount=sum(e.unexpired_delta for e in effects),
        available_after=_available(wallet, now_us),
        reserved_after=wallet.reserved,
        grant_id="",
        reservation_id=resolved.reservation_id,
        idempotency_key="",
        principal=caller.principal,
        action=caller.action,
        request_id=caller.request_id,
        created_at_us=now_us,
        grant_effects=tuple(effects),
    )
    assert entry.available_after >= 0 and entry.reserved_after >= 0, entry
    assert (
        resolved.amount_committed + resolved.amount_released + resolved.amount_expired
        == resolved.amount
    )
    writes.reservations.append(
        (
            call.account_id,
            resolved.reservation_id,
            status.value,
            resolved.amount_committed,
            resolved.amount_released,
            entry.sequence,
        )
    )
    writes.entries.append(
        (
            call.account_id,
            resolved.credit_type,
            entry.sequence,
            kind.value,
            entry.amount,
            entry.available_after,
            entry.reserved_after,
            resolved.reservation_id,
            caller.principal,
            caller.action,
            caller.request_id,
            codec.effects_to_json(entry.grant_effects),
        )
    )
    return ReservationResult(resolved, entry)


def _available(wallet: _Wallet, now_us: int) -> int:
    return sum(
        lot.amount
        for lot in wallet.lots.values()
        if is_live(lot.effective_at_us, lot.expires_at_us, now_us)
    )


async def _write(
    conn: Any,
    now_us: int,
    writes: _Writes,
    wallet_rows: Sequence[tuple[str, str, int, int]],
) -> None:
    grant_rows = [(a, g, *d) for (a, g), d in writes.grant_deltas.items()]
    counts = await conn.fetchrow(
        _WRITE_SQL,
        *columns(grant_rows, 6),
        now_us,
        *columns(writes.reservations, 6),
        *columns(writes.entries, 12),
        *columns(wallet_rows, 4),
    )
    expected = (len(grant_rows), len(writes.reservations), len(writes.entries), len(wallet_rows))
    # Any difference is a bug (or a reservation resolved under our lock): roll the batch back.
    assert tuple(counts) == expected, f"resolve batch wrote {tuple(counts)}, meant {expected}"
