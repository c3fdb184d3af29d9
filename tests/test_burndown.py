"""The burn-down arithmetic, without a database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.burndown import Lot, allocate, burn_down_key, consume, is_live
from store.model import Slice


def lot(
    grant_id: str, amount: int, priority: int = 100, expires: int | None = None, effective: int = 0
) -> Lot:
    return Lot(grant_id, priority, effective, expires, amount)


def test_lower_priority_burns_first() -> None:
    slices = allocate([lot("a", 10, priority=100), lot("b", 10, priority=5)], 12)
    assert slices == [Slice("b", 10), Slice("a", 2)]


def test_expiring_credits_burn_before_durable_ones() -> None:
    slices = allocate(
        [lot("durable", 10), lot("late", 10, expires=200), lot("soon", 10, expires=100)], 25
    )
    assert slices == [Slice("soon", 10), Slice("late", 10), Slice("durable", 5)]


def test_older_grants_burn_first_then_grant_id_breaks_ties() -> None:
    slices = allocate(
        [lot("b", 5, effective=1), lot("a", 5, effective=1), lot("c", 5, effective=0)], 15
    )
    assert slices == [Slice("c", 5), Slice("a", 5), Slice("b", 5)]


def test_allocate_is_all_or_nothing() -> None:
    assert allocate([lot("a", 3), lot("b", 4)], 8) is None


def test_allocate_skips_empty_lots() -> None:
    assert allocate([lot("a", 0, priority=0), lot("b", 4)], 4) == [Slice("b", 4)]


def test_consume_takes_in_burn_down_order_and_returns_the_rest() -> None:
    outcomes = consume([lot("durable", 5), lot("promo", 5, priority=1)], 7)
    assert [(o.grant_id, o.consumed, o.returned) for o in outcomes] == [
        ("promo", 5, 0),
        ("durable", 2, 3),
    ]


def test_consume_refuses_more_than_held() -> None:
    with pytest.raises(AssertionError):
        consume([lot("a", 5)], 6)


def test_live_window_is_half_open() -> None:
    assert not is_live(effective_at_us=10, expires_at_us=20, now_us=9)
    assert is_live(10, 20, 10)
    assert is_live(10, 20, 19)
    assert not is_live(10, 20, 20)
    assert is_live(10, None, 10**15)


lots_strategy = st.lists(
    st.builds(
        lot,
        grant_id=st.text("abcdef", min_size=1, max_size=4),
        amount=st.integers(0, 50),
        priority=st.integers(0, 3),
        expires=st.none() | st.integers(1, 5),
        effective=st.integers(0, 3),
    ),
    max_size=8,
    unique_by=lambda x: x.grant_id,
)


@given(lots_strategy, st.integers(1, 200))
def test_allocation_takes_exactly_the_amount_from_the_first_lots_in_order(
    lots: list[Lot], amount: int
) -> None:
    slices = allocate(lots, amount)
    total = sum(x.amount for x in lots)
    if total < amount:
        assert slices is None
        return
    assert slices is not None
    assert sum(s.amount for s in slices) == amount
    by_id = {x.grant_id: x for x in lots}
    ordered = sorted((x for x in lots if x.amount > 0), key=burn_down_key)
    # Every lot before the last one used is drained completely: nothing later is touched first.
    assert [s.grant_id for s in slices] == [x.grant_id for x in ordered[: len(slices)]]
    for s in slices[:-1]:
        assert s.amount == by_id[s.grant_id].amount
    assert 0 < slices[-1].amount <= by_id[slices[-1].grant_id].amount


@given(lots_strategy.filter(lambda ls: any(x.amount > 0 for x in ls)), st.data())
def test_consume_conserves_every_credit(lots: list[Lot], data: st.DataObject) -> None:
    held = [x for x in lots if x.amount > 0]
    total = sum(x.amount for x in held)
    amount = data.draw(st.integers(0, total))
    outcomes = consume(held, amount)
    assert sum(o.consumed for o in outcomes) == amount
    assert sum(o.consumed + o.returned for o in outcomes) == total
    assert all(o.consumed >= 0 and o.returned >= 0 for o in outcomes)
