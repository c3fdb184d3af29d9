"""Row <-> value mapping and the small queries every operation shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from store import codec
from store.burndown import NO_SCHEDULED_CHANGE_US, Lot, is_live, next_liveness_change_us
from store.cache import AccountSnapshot, WalletSnapshot
from store.model import (
    AccountStatus,
    EntryKind,
    Grant,
    GrantSource,
    JournalEntry,
    Reservation,
    ReservationStatus,
    Slice,
)
from store.schema import accounts, grants, journal, reservation_slices, reservations, wallets


def upsert(conn: AsyncConnection, table: Any) -> Any:
    """INSERT that supports ON CONFLICT on both dialects."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


@dataclass(frozen=True)
class WalletState:
    last_sequence: int
    reserved: int


async def lock_wallet(
    conn: AsyncConnection, account_id: str, credit_type: str, *, skip_locked: bool = False
) -> WalletState | None:
    """Locks the wallet row (the wallet's serialisation point). None if it does not exist, or if
    skip_locked and another transaction holds it."""
    stmt = (
        select(wallets.c.last_sequence, wallets.c.reserved)
        .where(wallets.c.account_id == account_id, wallets.c.credit_type == credit_type)
        .with_for_update(skip_locked=skip_locked)
    )
    row = (await conn.execute(stmt)).first()
    return None if row is None else WalletState(row.last_sequence, row.reserved)


async def save_wallet(
    conn: AsyncConnection, account_id: str, credit_type: str, state: WalletState
) -> None:
    assert state.reserved >= 0, f"wallet {account_id}/{credit_type} reserved < 0: {state}"
    await conn.execute(
        update(wallets)
        .where(wallets.c.account_id == account_id, wallets.c.credit_type == credit_type)
        .values(last_sequence=state.last_sequence, reserved=state.reserved)
    )


def live_condition(now_us: int) -> Any:
    return and_(
        grants.c.remaining > 0,
        grants.c.effective_at_us <= now_us,
        or_(grants.c.expires_at_us.is_(None), grants.c.expires_at_us > now_us),
    )


async def available_and_next_change(
    conn: AsyncConnection, account_id: str, credit_type: str, now_us: int
) -> tuple[int, int]:
    """Sum of remaining over the wallet's live grants, and when that changes with time alone."""
    lots, next_change_us = await spendable_lots(conn, account_id, credit_type, now_us)
    return sum(lot.amount for lot in lots), next_change_us


async def spendable_lots(
    conn: AsyncConnection, account_id: str, credit_type: str, now_us: int
) -> tuple[list[Lot], int]:
    """The wallet's live lots (remaining credits of live grants), and the next instant the set
    changes with time alone (a grant taking effect or a live one expiring)."""
    rows_with_credits = await conn.execute(
        select(
            grants.c.grant_id,
            grants.c.priority,
            grants.c.effective_at_us,
            grants.c.expires_at_us,
            grants.c.remaining,
        ).where(
            grants.c.account_id == account_id,
            grants.c.credit_type == credit_type,
            grants.c.remaining > 0,
        )
    )
    lots = [
        Lot(r.grant_id, r.priority, r.effective_at_us, r.expires_at_us, r.remaining)
        for r in rows_with_credits
    ]
    live = [lot for lot in lots if is_live(lot.effective_at_us, lot.expires_at_us, now_us)]
    return live, next_liveness_change_us(lots, now_us)


def grant_from_row(row: Row[Any]) -> Grant:
    return Grant(
        grant_id=row.grant_id,
        account_id=row.account_id,
        credit_type=row.credit_type,
        amount=row.amount,
        remaining=row.remaining,
        held=row.held,
        consumed=row.consumed,
        expired=row.expired,
        source=GrantSource(row.source),
        priority=row.priority,
        effective_at_us=row.effective_at_us,
        expires_at_us=row.expires_at_us,
        external_ref=row.external_ref,
        metadata=codec.metadata_from_json(row.metadata_json),
        created_at_us=row.created_at_us,
        clawed_back=row.clawed_back,
    )


def reservation_from_row(row: Mapping[Any, Any], slices: Sequence[Slice]) -> Reservation:
    """A reservations row as a value: a SQLAlchemy row's `_mapping`, or an asyncpg Record (the
    batched Commit and Release read rows through asyncpg directly)."""
    return Reservation(
        reservation_id=row["reservation_id"],
        account_id=row["account_id"],
        credit_type=row["credit_type"],
        amount=row["amount"],
        status=ReservationStatus(row["status"]),
        created_at_us=row["created_at_us"],
        expires_at_us=row["expires_at_us"],
        resolved_at_us=row["resolved_at_us"],
        amount_committed=row["amount_committed"],
        amount_released=row["amount_released"],
        amount_expired=row["amount_expired"],
        action=row["action"],
        request_id=row["request_id"],
        metadata=codec.metadata_from_json(row["metadata_json"]),
        slices=tuple(slices),
    )


async def load_reservation(
    conn: AsyncConnection, account_id: str, reservation_id: str
) -> tuple[Reservation, int | None] | None:
    """The reservation and its resolution sequence, or None."""
    row = (
        await conn.execute(
            select(reservations).where(
                reservations.c.account_id == account_id,
                reservations.c.reservation_id == reservation_id,
            )
        )
    ).first()
    if row is None:
        return None
    slice_rows = await conn.execute(
        select(reservation_slices.c.grant_id, reservation_slices.c.amount).where(
            reservation_slices.c.account_id == account_id,
            reservation_slices.c.reservation_id == reservation_id,
        )
    )
    slices = [Slice(r.grant_id, r.amount) for r in slice_rows]
    return reservation_from_row(row._mapping, slices), row.resolution_sequence


def entry_from_row(row: Row[Any]) -> JournalEntry:
    return JournalEntry(
        account_id=row.account_id,
        credit_type=row.credit_type,
        sequence=row.sequence,
        kind=EntryKind(row.kind),
        amount=row.amount,
        available_after=row.available_after,
        reserved_after=row.reserved_after,
        grant_id=row.grant_id,
        reservation_id=row.reservation_id,
        idempotency_key=row.idempotency_key,
        principal=row.principal,
        action=row.action,
        request_id=row.request_id,
        created_at_us=row.created_at_us,
        grant_effects=codec.effects_from_json(row.grant_effects_json),
    )


async def load_entry(
    conn: AsyncConnection, account_id: str, credit_type: str, sequence: int
) -> JournalEntry:
    row = (
        await conn.execute(
            select(journal).where(
                journal.c.account_id == account_id,
                journal.c.credit_type == credit_type,
                journal.c.sequence == sequence,
            )
        )
    ).one()
    return entry_from_row(row)


async def append_entry(conn: AsyncConnection, entry: JournalEntry) -> None:
    assert entry.available_after >= 0, f"available would go negative: {entry}"
    assert entry.reserved_after >= 0, f"reserved would go negative: {entry}"
    assert entry.amount == sum(e.unexpired_delta for e in entry.grant_effects), entry
    await conn.execute(
        insert(journal).values(
            account_id=entry.account_id,
            credit_type=entry.credit_type,
            sequence=entry.sequence,
            kind=entry.kind.value,
            amount=entry.amount,
            available_after=entry.available_after,
            reserved_after=entry.reserved_after,
            grant_id=entry.grant_id,
            reservation_id=entry.reservation_id,
            idempotency_key=entry.idempotency_key,
            principal=entry.principal,
            action=entry.action,
            request_id=entry.request_id,
            created_at_us=entry.created_at_us,
            grant_effects_json=codec.effects_to_json(entry.grant_effects),
        )
    )


async def read_snapshots(
    conn: AsyncConnection, account_id: str, credit_type: str, now_us: int
) -> tuple[WalletSnapshot, AccountSnapshot]:
    """The wallet's balances and the account's status, in one statement (one consistent read).

    valid_until_us is the next instant the available amount changes with time alone: the
    earliest future effective_at, or expires_at of a live grant with credits remaining.
    """
    in_wallet = and_(
        grants.c.account_id == account_id,
        grants.c.credit_type == credit_type,
        grants.c.remaining > 0,
    )
    live_remaining = (
        select(func.coalesce(func.sum(grants.c.remaining), 0))
        .where(in_wallet, live_condition(now_us))
        .scalar_subquery()
    )
    next_change = (
        select(
            func.min(
                case(
                    (grants.c.effective_at_us > now_us, grants.c.effective_at_us),
                    (grants.c.expires_at_us > now_us, grants.c.expires_at_us),
                    else_=None,
                )
            )
        )
        .where(in_wallet)
        .scalar_subquery()
    )
    wallet_row = (wallets.c.account_id == account_id) & (wallets.c.credit_type == credit_type)
    row = (
        await conn.execute(
            select(
                select(wallets.c.last_sequence).where(wallet_row).scalar_subquery(),
                select(wallets.c.reserved).where(wallet_row).scalar_subquery(),
                live_remaining,
                next_change,
                select(accounts.c.status)
                .where(accounts.c.account_id == account_id)
                .scalar_subquery(),
                select(accounts.c.status_version)
                .where(accounts.c.account_id == account_id)
                .scalar_subquery(),
            )
        )
    ).one()
    version, reserved, available_now, next_change_us, status, status_version = row
    wallet = WalletSnapshot(
        version=int(version or 0),
        available=int(available_now),
        reserved=int(reserved or 0),
        valid_until_us=NO_SCHEDULED_CHANGE_US if next_change_us is None else int(next_change_us),
        as_of_us=now_us,
    )
    account = AccountSnapshot(
        version=int(status_version or 0),
        status=AccountStatus.ACTIVE if status is None else AccountStatus(status),
    )
    return wallet, account


async def read_account_snapshot(conn: AsyncConnection, account_id: str) -> AccountSnapshot:
    row = (
        await conn.execute(
            select(accounts.c.status, accounts.c.status_version).where(
                accounts.c.account_id == account_id
            )
        )
    ).first()
    if row is None:
        return AccountSnapshot(version=0, status=AccountStatus.ACTIVE)
    return AccountSnapshot(version=int(row.status_version), status=AccountStatus(row.status))
