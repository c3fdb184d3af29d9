"""This process's copy of each wallet as its last Reserve, Commit or Release batch committed it
(lever 21).

A Reserve batch needs each wallet's sequence, reserved total and live grants before it decides.
Reading them is one of a batch's two round trips. When this process's batches wrote the wallet
last, it already knows them: those batches' decisions left them in memory. A batch whose wallets all
have a copy here decides on the copies and goes straight to its compare-and-set write, one
round trip instead of two.

Nothing here is trusted (DESIGN.md invariant 5): the write takes a wallet only if it is still at
the copy's sequence and its account is not locked, and every change to a wallet's grants
advances its sequence in the same transaction (store/reserve_batch.py). A copy that is behind
the database (another replica or another operation wrote the wallet) loses the compare and set,
and its calls take the read path. Only committed states are kept, so a copy's sequence names
exactly one state of the wallet: sequences never repeat.

Copies are plain tuples of immutable values, out of the collector's sight like the balance
cache's entries (store/cache.py), and bounded (--wallet-copies; 0 keeps none): the oldest
written goes first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from store import limits
from store.burndown import Lot, is_live, next_liveness_change_us
from store.cache import WalletSnapshot

if TYPE_CHECKING:
    from store.batching import Published

# (grant id, priority, effective at µs, expires at µs or None, remaining)
_LotFields = tuple[str, int, int, int | None, int]
# (last sequence, reserved, valid until µs, live lots)
_Copy = tuple[int, int, int, tuple[_LotFields, ...]]
WalletKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class WalletCopy:
    """A wallet as a committed write left it: what a batch decides on instead of a read."""

    last_sequence: int
    reserved: int
    # The wallet's live grants stay live, and no other takes effect, until this instant
    # (burndown.next_liveness_change_us): after it the copy says nothing.
    valid_until_us: int
    lots: Sequence[Lot]

    def snapshot(self, as_of_us: int) -> WalletSnapshot:
        """The balance cache's snapshot of the same state."""
        return WalletSnapshot(
            version=self.last_sequence,
            available=sum(lot.amount for lot in self.lots),
            reserved=self.reserved,
            valid_until_us=self.valid_until_us,
            as_of_us=as_of_us,
        )


def copy_of(last_sequence: int, reserved: int, lots: Iterable[Lot], now_us: int) -> WalletCopy:
    """The copy of a wallet whose grants with credits left are `lots` (live or not), as of
    `now_us`."""
    lots = list(lots)
    return WalletCopy(
        last_sequence,
        reserved,
        next_liveness_change_us(lots, now_us),
        [lot for lot in lots if is_live(lot.effective_at_us, lot.expires_at_us, now_us)],
    )


class WalletCopies:
    def __init__(self, entries_max: int = limits.WALLET_COPIES_DEFAULT) -> None:
        assert 0 <= entries_max <= limits.WALLET_COPIES_MAX
        self._entries_max = entries_max
        self._copies: dict[WalletKey, _Copy] = {}
        # Batches that decided on copies, and those of them handed to the read path after all
        # (a copy behind the database, a key stored already, or a refusal among the calls).
        self.decided = 0
        self.reread = 0

    def __len__(self) -> int:
        return len(self._copies)

    def take(self, keys: Iterable[WalletKey], now_us: int) -> dict[WalletKey, WalletCopy] | None:
        """The copies of all `keys`, still valid at `now_us`, or None when any is missing.
        Taken copies leave: a batch in flight on a wallet is the only one deciding on its copy
        (a batch beside it reads), and its write puts the next one back."""
        copies = self._copies
        for key in keys:
            entry = copies.get(key)
            if entry is None or now_us >= entry[2]:
                return None
        taken: dict[WalletKey, WalletCopy] = {}
        for key in keys:
            last_sequence, reserved, valid_until_us, lots = copies.pop(key)
            taken[key] = WalletCopy(
                last_sequence, reserved, valid_until_us, [Lot(*fields) for fields in lots]
            )
        return taken

    def keep(self, key: WalletKey, copy: WalletCopy) -> None:
        """Keeps the copy of a state the database has committed, unless a newer one is here."""
        if not self._entries_max:
            return
        entry = self._copies.get(key)
        if entry is not None and entry[0] >= copy.last_sequence:
            return
        self._copies.pop(key, None)  # re-inserted last: the newest written goes last
        self._copies[key] = (
            copy.last_sequence,
            copy.reserved,
            copy.valid_until_us,
            tuple(
                (lot.grant_id, lot.priority, lot.effective_at_us, lot.expires_at_us, lot.amount)
                for lot in copy.lots
            ),
        )
        if len(self._copies) > self._entries_max:
            del self._copies[next(iter(self._copies))]

    def published(self, snapshots: Sequence[Published]) -> None:
        """Another write of this process committed these wallet versions: a copy behind them
        would only lose its compare and set, so it goes now."""
        copies = self._copies
        for account_id, credit_type, snapshot in snapshots:
            key = (account_id, credit_type)
            entry = copies.get(key)
            if entry is not None and entry[0] < snapshot.version:
                del copies[key]
