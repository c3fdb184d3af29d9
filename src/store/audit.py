"""Replays the journal and reports every wallet, grant or reservation whose stored state differs
from what the journal says (DESIGN.md invariants 1-3)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from store import codec
from store.burndown import is_live
from store.model import EntryKind, ReservationStatus
from store.schema import grants, journal, reservation_slices, reservations, wallets


@dataclass(frozen=True)
class Mismatch:
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.detail}"


@dataclass
class _GrantReplay:
    credit_type: str
    effective_at_us: int
    expires_at_us: int | None
    amount: int = 0
    remaining: int = 0
    held: int = 0
    consumed: int = 0
    expired: int = 0
    clawed_back: int = 0

    def parts(self) -> tuple[int, int, int, int, int]:
        return (self.remaining, self.held, self.consumed, self.expired, self.clawed_back)


@dataclass
class _WalletReplay:
    last_sequence: int = 0
    grant_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class AuditReport:
    wallets: int
    grants: int
    entries: int
    reservations: int
    mismatches: tuple[Mismatch, ...]

    @property
    def clean(self) -> bool:
        return not self.mismatches


async def audit(engine: AsyncEngine, account_prefix: str = "") -> AuditReport:
    async with engine.connect() as conn:
        return await _audit(conn, account_prefix)


def _prefix_filter(column: object, prefix: str) -> object:
    return column.startswith(prefix, autoescape=True)  # type: ignore[attr-defined]


async def _audit(conn: AsyncConnection, prefix: str) -> AuditReport:
    problems: list[Mismatch] = []
    grant_replay: dict[tuple[str, str], _GrantReplay] = {}
    for row in await conn.execute(
        select(
            grants.c.account_id,
            grants.c.grant_id,
            grants.c.credit_type,
            grants.c.effective_at_us,
            grants.c.expires_at_us,
        ).where(_prefix_filter(grants.c.account_id, prefix))  # type: ignore[arg-type]
    ):
        grant_replay[(row.account_id, row.grant_id)] = _GrantReplay(
            row.credit_type, row.effective_at_us, row.expires_at_us
        )
    wallet_replay: dict[tuple[str, str], _WalletReplay] = defaultdict(_WalletReplay)
    committed_by_reservation: dict[tuple[str, str], int] = defaultdict(int)
    entries = 0
    stream = await conn.stream(
        select(journal)
        .where(_prefix_filter(journal.c.account_id, prefix))  # type: ignore[arg-type]
        .order_by(journal.c.account_id, journal.c.credit_type, journal.c.sequence)
    )
    async for row in stream:
        entries += 1
        wallet_key = (row.account_id, row.credit_type)
        subject = f"journal {row.account_id}/{row.credit_type}#{row.sequence}"
        wallet = wallet_replay[wallet_key]
        if row.sequence != wallet.last_sequence + 1:
            problems.append(Mismatch(subject, f"sequence gap after #{wallet.last_sequence}"))
        wallet.last_sequence = row.sequence
        effects = codec.effects_from_json(row.grant_effects_json)
        if row.amount != sum(e.unexpired_delta for e in effects):
            problems.append(Mismatch(subject, "amount differs from its grant effects"))
        for effect in effects:
            grant = grant_replay.get((row.account_id, effect.grant_id))
            if grant is None:
                problems.append(Mismatch(subject, f"names unknown grant {effect.grant_id}"))
                continue
            if row.kind == EntryKind.GRANT.value:
                grant.amount += effect.remaining_delta
            grant.remaining += effect.remaining_delta
            grant.held += effect.held_delta
            grant.consumed += effect.consumed_delta
            grant.expired += effect.expired_delta
            grant.clawed_back += effect.clawed_back_delta
            wallet.grant_ids.add(effect.grant_id)
            if min(grant.parts()) < 0:
                problems.append(Mismatch(subject, f"grant {effect.grant_id} goes negative"))
        if row.kind == EntryKind.COMMIT.value:
            committed_by_reservation[(row.account_id, row.reservation_id)] += sum(
                e.consumed_delta for e in effects
            )
        live_grants = [grant_replay[(row.account_id, g)] for g in wallet.grant_ids]
        available = sum(
            g.remaining
            for g in live_grants
            if is_live(g.effective_at_us, g.expires_at_us, row.created_at_us)
        )
        reserved = sum(g.held for g in live_grants)
        if (row.available_after, row.reserved_after) != (available, reserved):
            problems.append(
                Mismatch(
                    subject,
                    f"records available={row.available_after} reserved={row.reserved_after}, "
                    f"replay gives available={available} reserved={reserved}",
                )
            )

    wallet_count = 0
    for row in await conn.execute(
        select(wallets).where(_prefix_filter(wallets.c.account_id, prefix))  # type: ignore[arg-type]
    ):
        wallet_count += 1
        replay = wallet_replay.get((row.account_id, row.credit_type), _WalletReplay())
        held = sum(grant_replay[(row.account_id, g)].held for g in replay.grant_ids)
        if (row.last_sequence, row.reserved) != (replay.last_sequence, held):
            problems.append(
                Mismatch(
                    f"wallet {row.account_id}/{row.credit_type}",
                    f"stores sequence={row.last_sequence} reserved={row.reserved}, "
                    f"replay gives sequence={replay.last_sequence} reserved={held}",
                )
            )

    for row in await conn.execute(
        select(grants).where(_prefix_filter(grants.c.account_id, prefix))  # type: ignore[arg-type]
    ):
        replayed = grant_replay[(row.account_id, row.grant_id)]
        stored = (row.amount, row.remaining, row.held, row.consumed, row.expired, row.clawed_back)
        if stored != (replayed.amount, *replayed.parts()):
            problems.append(
                Mismatch(
                    f"grant {row.account_id}/{row.grant_id}",
                    f"stores amount/remaining/held/consumed/expired/clawed_back={stored}, "
                    f"replay gives {(replayed.amount, *replayed.parts())}",
                )
            )

    held_by_pending: dict[tuple[str, str], int] = defaultdict(int)
    reservation_count = 0
    pending = {
        (r.account_id, r.reservation_id)
        for r in await conn.execute(
            select(reservations.c.account_id, reservations.c.reservation_id).where(
                reservations.c.status == ReservationStatus.PENDING.value,
                _prefix_filter(reservations.c.account_id, prefix),  # type: ignore[arg-type]
            )
        )
    }
    for row in await conn.execute(
        select(reservation_slices).where(
            _prefix_filter(reservation_slices.c.account_id, prefix)  # type: ignore[arg-type]
        )
    ):
        if (row.account_id, row.reservation_id) in pending:
            held_by_pending[(row.account_id, row.grant_id)] += row.amount
    for key, replayed in grant_replay.items():
        if replayed.held != held_by_pending.get(key, 0):
            problems.append(
                Mismatch(
                    f"grant {key[0]}/{key[1]}",
                    f"held={replayed.held} but pending reservations pin "
                    f"{held_by_pending.get(key, 0)}",
                )
            )
    for row in await conn.execute(
        select(reservations).where(_prefix_filter(reservations.c.account_id, prefix))  # type: ignore[arg-type]
    ):
        reservation_count += 1
        subject = f"reservation {row.account_id}/{row.reservation_id}"
        parts = row.amount_committed + row.amount_released + row.amount_expired
        if row.status != ReservationStatus.PENDING.value and parts != row.amount:
            problems.append(Mismatch(subject, f"resolved parts sum to {parts}, not {row.amount}"))
        committed = committed_by_reservation.get((row.account_id, row.reservation_id), 0)
        if committed != row.amount_committed:
            problems.append(
                Mismatch(
                    subject,
                    f"amount_committed={row.amount_committed}, journal consumed {committed}",
                )
            )
    return AuditReport(
        wallets=wallet_count,
        grants=len(grant_replay),
        entries=entries,
        reservations=reservation_count,
        mismatches=tuple(problems),
    )
