"""The burn-down order and the arithmetic of holding and consuming credits. Pure: no I/O.

One comparator serves reserving, consuming and explaining (DESIGN.md): priority ascending, then
expires_at ascending with never-expiring last, then effective_at ascending, then grant id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from store.model import Slice


@dataclass(frozen=True)
class Lot:
    """The part of a grant that burn-down may take from."""

    grant_id: str
    priority: int
    effective_at_us: int
    expires_at_us: int | None
    amount: int


BurnDownKey = tuple[int, int, int, int, str]


def burn_down_key(lot: Lot) -> BurnDownKey:
    never_expires = lot.expires_at_us is None
    return (
        lot.priority,
        1 if never_expires else 0,
        0 if lot.expires_at_us is None else lot.expires_at_us,
        lot.effective_at_us,
        lot.grant_id,
    )


def is_live(effective_at_us: int, expires_at_us: int | None, now_us: int) -> bool:
    """A grant is live once effective_at has passed and until expires_at."""
    return effective_at_us <= now_us and (expires_at_us is None or now_us < expires_at_us)


def allocate(lots: Iterable[Lot], amount: int) -> list[Slice] | None:
    """Slices that pin `amount` across lots in burn-down order, or None when they fall short.

    All or nothing: either the slices sum to exactly `amount`, or nothing is taken.
    """
    assert amount > 0, f"allocate needs a positive amount, got {amount}"
    slices: list[Slice] = []
    needed = amount
    for lot in sorted(lots, key=burn_down_key):
        assert lot.amount >= 0, f"lot {lot.grant_id} has a negative amount {lot.amount}"
        if needed == 0:
            break
        taken = min(lot.amount, needed)
        if taken > 0:
            slices.append(Slice(grant_id=lot.grant_id, amount=taken))
            needed -= taken
    if needed > 0:
        return None
    assert sum(s.amount for s in slices) == amount
    return slices


@dataclass(frozen=True)
class SliceOutcome:
    grant_id: str
    consumed: int
    returned: int


def consume(slice_lots: Sequence[Lot], amount: int) -> list[SliceOutcome]:
    """Splits a reservation's slices into consumed and returned parts, consuming in burn-down order.

    `slice_lots` carry each pinned slice as a Lot whose amount is the slice's amount.
    """
    total = sum(lot.amount for lot in slice_lots)
    assert 0 <= amount <= total, f"cannot consume {amount} of a {total} hold"
    outcomes: list[SliceOutcome] = []
    to_consume = amount
    for lot in sorted(slice_lots, key=burn_down_key):
        assert lot.amount > 0, f"slice of {lot.grant_id} must be positive"
        consumed = min(lot.amount, to_consume)
        to_consume -= consumed
        outcomes.append(SliceOutcome(lot.grant_id, consumed, lot.amount - consumed))
    assert to_consume == 0
    assert sum(o.consumed for o in outcomes) == amount
    assert sum(o.consumed + o.returned for o in outcomes) == total
    return outcomes


# "Never changes by itself": far beyond any timestamp the limits allow.
NO_SCHEDULED_CHANGE_US = 2**62


def next_liveness_change_us(lots: Iterable[Lot], now_us: int) -> int:
    """The next instant the spendable amount of these lots changes with time alone: a lot that
    takes effect, or a live lot that expires. Lots with nothing left never matter."""
    upcoming = [
        lot.effective_at_us if lot.effective_at_us > now_us else lot.expires_at_us
        for lot in lots
        if lot.amount > 0
        and (
            lot.effective_at_us > now_us
            or (lot.expires_at_us is not None and lot.expires_at_us > now_us)
        )
    ]
    return min((t for t in upcoming if t is not None), default=NO_SCHEDULED_CHANGE_US)
