"""The Reserve batches' copies of the wallets they wrote (store/wallet_copies.py): what is
kept, what is dropped, and the bound. How batches use them is in test_batching.py."""

from __future__ import annotations

from store.burndown import Lot
from store.cache import WalletSnapshot
from store.wallet_copies import WalletCopies, WalletCopy, copy_of

LOT = Lot("g1", 1, 0, None, 10)


def copy(sequence: int, valid_until_us: int = 1_000) -> WalletCopy:
    return WalletCopy(sequence, 0, valid_until_us, [LOT])


def snapshot(version: int) -> WalletSnapshot:
    return WalletSnapshot(version=version, available=0, reserved=0, valid_until_us=0, as_of_us=0)


def test_a_taken_copy_leaves_and_reads_back_what_was_kept() -> None:
    copies = WalletCopies()
    copies.keep(("a", "c"), copy(3))
    taken = copies.take([("a", "c")], now_us=0)
    assert taken == {("a", "c"): copy(3)}
    assert copies.take([("a", "c")], now_us=0) is None


def test_a_batch_gets_its_copies_all_or_none() -> None:
    copies = WalletCopies()
    copies.keep(("a", "c"), copy(3))
    assert copies.take([("a", "c"), ("b", "c")], now_us=0) is None
    assert len(copies) == 1  # nothing was taken


def test_a_copy_past_its_validity_is_not_taken() -> None:
    copies = WalletCopies()
    copies.keep(("a", "c"), copy(3, valid_until_us=100))
    assert copies.take([("a", "c")], now_us=100) is None
    assert copies.take([("a", "c")], now_us=99) is not None


def test_an_older_state_never_replaces_a_newer_copy() -> None:
    copies = WalletCopies()
    copies.keep(("a", "c"), copy(5))
    copies.keep(("a", "c"), copy(4))  # a batch whose answer came back late
    taken = copies.take([("a", "c")], now_us=0)
    assert taken is not None and taken[("a", "c")].last_sequence == 5


def test_another_write_drops_only_the_copies_it_is_newer_than() -> None:
    copies = WalletCopies()
    copies.keep(("a", "c"), copy(5))
    copies.keep(("b", "c"), copy(5))
    copies.published([("a", "c", snapshot(6)), ("b", "c", snapshot(5))])
    assert copies.take([("a", "c")], now_us=0) is None
    assert copies.take([("b", "c")], now_us=0) is not None


def test_the_copies_are_bounded_and_the_oldest_written_goes_first() -> None:
    copies = WalletCopies(entries_max=2)
    copies.keep(("a", "c"), copy(1))
    copies.keep(("b", "c"), copy(1))
    copies.keep(("a", "c"), copy(2))  # written again: now the newest
    copies.keep(("d", "c"), copy(1))
    assert len(copies) == 2
    assert copies.take([("b", "c")], now_us=0) is None
    assert copies.take([("a", "c"), ("d", "c")], now_us=0) is not None


def test_with_no_room_nothing_is_kept() -> None:
    copies = WalletCopies(entries_max=0)  # --wallet-copies 0
    copies.keep(("a", "c"), copy(1))
    assert len(copies) == 0 and copies.take([("a", "c")], now_us=0) is None


def test_a_copy_holds_the_live_lots_until_the_next_one_takes_effect_or_expires() -> None:
    live = Lot("live", 1, 0, 500, 10)
    later = Lot("later", 1, 300, None, 10)
    gone = Lot("gone", 1, 0, 50, 10)  # expired, not yet swept
    made = copy_of(7, 2, [live, later, gone], now_us=100)
    assert made == WalletCopy(7, 2, 300, [live])
    # What the batch publishes of the same state: the live lots' credits, valid as long.
    assert made.snapshot(as_of_us=100) == WalletSnapshot(
        version=7, available=10, reserved=2, valid_until_us=300, as_of_us=100
    )
