"""Group commit on Postgres: Reserve, Commit and Release calls that share a transaction decide
exactly as one call at a time would.

Every test checks the batcher really batched (or really handed back), so a silent fallback to
the one-call path cannot pass for the batch path.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from conftest import assert_no_failed_batches, asyncpg_dsn
from sqlalchemy.engine import make_url

from store import limits
from store.audit import audit
from store.cache import LocalBalanceCache
from store.clock import ManualClock
from store.database import create_engine
from store.errors import (
    AccountLocked,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidRequest,
    ReservationStateConflict,
)
from store.history import read_history
from store.ledger import Ledger, LedgerSettings
from store.model import (
    AccountStatus,
    AddCreditsCommand,
    Caller,
    CommitCommand,
    GrantSource,
    HistoryQuery,
    ReleaseCommand,
    ReservationResult,
    ReservationStatus,
    ReserveCommand,
)
from store.reserve_batch import ReserveBatcher
from store.resolve_batch import ResolveBatcher
from store.wallet_copies import WalletCopies

Accounts = Callable[[str], str]
CALLER = Caller(principal="svc:test", action="test.batch", request_id="req-b")
pytestmark = [pytest.mark.postgres]


@pytest.fixture
async def pg_ledger(
    postgres_url: str, clock: ManualClock, accounts: Accounts, request: pytest.FixtureRequest
) -> AsyncIterator[Ledger]:
    engine = create_engine(postgres_url)
    try:
        ledger = Ledger(engine, clock, LedgerSettings())
        yield ledger
        await ledger.close()
        report = await audit(engine, accounts.prefix)  # type: ignore[attr-defined]
        assert report.clean, "\n".join(map(str, report.mismatches))
        assert_no_failed_batches(ledger, request)
    finally:
        await engine.dispose()


def batcher(ledger: Ledger) -> ReserveBatcher:
    assert ledger.reserve_batcher is not None, "Postgres ledgers batch reserves"
    return ledger.reserve_batcher


def resolver(ledger: Ledger) -> ResolveBatcher:
    assert ledger.resolve_batcher is not None, "Postgres ledgers batch commits and releases"
    return ledger.resolve_batcher


async def fund(ledger: Ledger, account: str, amount: int, key: str = "fund", **kw: object) -> None:
    await ledger.add_credits(
        AddCreditsCommand(account, "default", amount, key, GrantSource.PURCHASE, **kw),  # type: ignore[arg-type]
        CALLER,
    )


@asynccontextmanager
async def holding_wallet(postgres_url: str, account: str) -> AsyncIterator[Any]:
    """Another session's transaction holding the lock of `account`'s default wallet (roll the
    transaction back to let go)."""
    blocker = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT 1 FROM wallets WHERE account_id = $1 FOR UPDATE", account)
        yield holding
    finally:
        await blocker.close()


async def outcome(ledger: Ledger, account: str, amount: int, key: str) -> str:
    try:
        await ledger.reserve(ReserveCommand(account, "default", amount, key), CALLER)
        return "OK"
    except (InsufficientCredits, AccountLocked) as failure:
        return failure.reason


async def test_a_hot_wallet_is_spent_exactly_once_per_credit_in_batches(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    account = accounts("hot")
    await fund(pg_ledger, account, 60, "a", priority=1)
    await fund(pg_ledger, account, 40, "b", priority=2)
    results = await asyncio.gather(*(outcome(pg_ledger, account, 1, f"r{i}") for i in range(200)))
    assert Counter(results) == {"OK": 100, "INSUFFICIENT_CREDITS": 100}
    counters = batcher(pg_ledger).counters
    assert counters.largest_batch > 1 and counters.failed_batches == 0
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (0, 100)
    # Replays go the one-call path and return the stored outcome of each key.
    replays = await asyncio.gather(*(outcome(pg_ledger, account, 1, f"r{i}") for i in range(200)))
    assert replays == results


async def test_many_wallets_in_one_batch_keep_their_own_sequences_and_burn_down_order(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    wallets = [accounts(f"w{i}") for i in range(20)]
    for account in wallets:
        await fund(pg_ledger, account, 5, "promo", priority=1)
        await fund(pg_ledger, account, 100, "paid", priority=5)
    calls = [(account, i) for i in range(10) for account in wallets]
    results = await asyncio.gather(
        *(pg_ledger.reserve(ReserveCommand(a, "default", 2, f"k{i}"), CALLER) for a, i in calls)
    )
    assert batcher(pg_ledger).counters.largest_batch > 1
    for account in wallets:
        mine = sorted(
            (r for r in results if r.reservation.account_id == account),
            key=lambda r: r.entry.sequence,
        )
        # Two grant entries, then ten reserves with consecutive sequences and balances.
        assert [r.entry.sequence for r in mine] == list(range(3, 13))
        assert [r.entry.available_after for r in mine] == list(range(103, 83, -2))
        # The promo lot (priority 1) is taken first: 2 + 2 + 1 of it, then the paid grant.
        taken = [[s.amount for s in r.reservation.slices] for r in mine[:3]]
        assert taken == [[2], [2], [1, 1]]
        balance = await pg_ledger.check(account, "default", consistent=True)
        assert (balance.available, balance.reserved) == (85, 20)


async def test_the_same_key_many_times_at_once_has_one_effect(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    account = accounts("dup")
    await fund(pg_ledger, account, 10)
    results: list[ReservationResult] = await asyncio.gather(
        *(
            pg_ledger.reserve(ReserveCommand(account, "default", 3, "same"), CALLER)
            for _ in range(30)
        )
    )
    assert len({r.reservation.reservation_id for r in results}) == 1
    assert all(r == results[0] for r in results)
    assert batcher(pg_ledger).counters.handed_back >= 29
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (7, 3)


async def test_failures_are_decided_in_the_batch_and_stored_under_their_keys(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    locked, empty, short = accounts("locked"), accounts("empty"), accounts("short")
    await fund(pg_ledger, locked, 10)
    await pg_ledger.set_account_status(locked, AccountStatus.LOCKED, "test", CALLER)
    await fund(pg_ledger, short, 2)
    results = await asyncio.gather(
        outcome(pg_ledger, locked, 1, "k"),
        outcome(pg_ledger, empty, 1, "k"),
        outcome(pg_ledger, short, 3, "k"),
        outcome(pg_ledger, short, 2, "k2"),
    )
    assert results == ["ACCOUNT_LOCKED", "INSUFFICIENT_CREDITS", "INSUFFICIENT_CREDITS", "OK"]
    # Final for their keys: the same answers after the lock is lifted and credits arrive.
    await pg_ledger.set_account_status(locked, AccountStatus.ACTIVE, "test", CALLER)
    await fund(pg_ledger, empty, 10)
    await fund(pg_ledger, short, 10, "more")
    assert await outcome(pg_ledger, locked, 1, "k") == "ACCOUNT_LOCKED"
    assert await outcome(pg_ledger, empty, 1, "k") == "INSUFFICIENT_CREDITS"
    assert await outcome(pg_ledger, short, 3, "k") == "INSUFFICIENT_CREDITS"
    with pytest.raises(IdempotencyKeyReused):
        await pg_ledger.reserve(ReserveCommand(short, "default", 4, "k"), CALLER)


async def meanwhile(
    monkeypatch: pytest.MonkeyPatch, ledger: Ledger, change: Callable[[], Any]
) -> None:
    """Runs `change` (and commits it) in the next batch between its read and its write."""
    reserves = batcher(ledger)
    write = reserves._decide_and_write_guarded

    async def after_the_read(*args: Any) -> Any:
        monkeypatch.setattr(reserves, "_decide_and_write_guarded", write)
        await change()
        return await write(*args)

    monkeypatch.setattr(reserves, "_decide_and_write_guarded", after_the_read)


async def test_a_wallet_that_moved_after_the_batch_read_it_is_decided_again_under_its_lock(
    pg_ledger: Ledger, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch decided on a wallet of 5; a grant of 10 landed before its write. The write
    leaves that wallet alone (its sequence moved), and the locking path decides again on 15."""
    account = accounts("moved")
    await fund(pg_ledger, account, 5)
    await meanwhile(monkeypatch, pg_ledger, lambda: fund(pg_ledger, account, 10, "meanwhile"))
    result = await pg_ledger.reserve(ReserveCommand(account, "default", 3, "r"), CALLER)
    assert (result.entry.sequence, result.entry.available_after) == (3, 12)
    counters = batcher(pg_ledger).counters
    assert (counters.lost_compare_and_set, counters.handed_back) == (1, 0)
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (12, 3)


async def test_a_key_stored_after_the_batch_read_it_is_answered_from_what_was_stored(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same Reserve sent twice at once, one copy through another replica that settled it
    between this batch's read and its write: the write fails whole on the key, and the call gets
    the stored outcome."""
    account = accounts("twice")
    await fund(pg_ledger, account, 5)
    command = ReserveCommand(account, "default", 8, "same")  # more than there is: no wallet moves
    elsewhere = Ledger(pg_ledger.engine, clock, LedgerSettings(batch_writes=False))
    stored: list[str] = []

    async def other_replica() -> None:
        stored.append(await outcome(elsewhere, account, 8, "same"))

    await meanwhile(monkeypatch, pg_ledger, other_replica)
    with pytest.raises(InsufficientCredits):
        await pg_ledger.reserve(command, CALLER)
    assert stored == ["INSUFFICIENT_CREDITS"]
    counters = batcher(pg_ledger).counters
    assert (counters.lost_compare_and_set, counters.handed_back) == (1, 1)
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (5, 0)


async def test_a_caller_that_gave_up_before_its_turn_leaves_nothing_and_its_key_free(
    pg_ledger: Ledger, postgres_url: str, accounts: Accounts
) -> None:
    account = accounts("gaveup")
    await fund(pg_ledger, account, 10)
    async with holding_wallet(postgres_url, account) as holding:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pg_ledger.reserve(ReserveCommand(account, "default", 4, "late"), CALLER)
        await holding.rollback()
    await batcher(pg_ledger).close()
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (10, 0)
    # The key is free: another amount under it is a new request, not a reuse.
    result = await pg_ledger.reserve(ReserveCommand(account, "default", 5, "late"), CALLER)
    assert result.reservation.amount == 5


async def reserve_with_one_account_refused(
    ledger: Ledger, accounts: Accounts, account: str, bad: str, *, at_commit: bool
) -> list[object]:
    """Five Reserves on each of `account` and `bad` at once, while a trigger refuses every
    reservation of `bad`: as it is inserted, or (`at_commit`) at COMMIT."""
    function = "refuse_" + "".join(c for c in accounts.prefix if c.isalnum())  # type: ignore[attr-defined]
    trigger = (
        f"CREATE CONSTRAINT TRIGGER {function} AFTER INSERT ON reservations "
        "DEFERRABLE INITIALLY DEFERRED"
        if at_commit
        else f"CREATE TRIGGER {function} BEFORE INSERT ON reservations"
    )
    async with ledger.engine.begin() as conn:
        await conn.exec_driver_sql(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.account_id = '{bad}' THEN RAISE EXCEPTION 'refused'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.exec_driver_sql(f"{trigger} FOR EACH ROW EXECUTE FUNCTION {function}()")
    try:
        return await asyncio.gather(
            *(
                ledger.reserve(ReserveCommand(a, "default", 1, f"k{i}"), CALLER)
                for i in range(5)
                for a in (account, bad)
            ),
            return_exceptions=True,
        )
    finally:
        async with ledger.engine.begin() as conn:
            await conn.exec_driver_sql(f"DROP TRIGGER {function} ON reservations")
            await conn.exec_driver_sql(f"DROP FUNCTION {function}()")


@pytest.mark.batch_failures_expected
async def test_a_failed_batch_hands_every_call_to_the_one_call_path(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    """A batch that fails (here: a trigger refuses one reservation of it) rolls back whole; each
    call then runs alone, so only the refused one fails."""
    account, bad = accounts("ok"), accounts("bad")
    await fund(pg_ledger, account, 10)
    await fund(pg_ledger, bad, 10)
    results = await reserve_with_one_account_refused(
        pg_ledger, accounts, account, bad, at_commit=False
    )
    assert batcher(pg_ledger).counters.failed_batches >= 1
    good = [r for r in results if isinstance(r, ReservationResult)]
    assert len(good) == 5 and {r.reservation.account_id for r in good} == {account}
    assert all(not isinstance(r, ReservationResult) for r in results[1::2])
    assert (await pg_ledger.check(bad, "default", consistent=True)).available == 10
    assert (await pg_ledger.check(account, "default", consistent=True)).available == 5


async def test_a_batch_whose_commit_fails_leaves_no_snapshot_in_the_cache(
    postgres_url: str, clock: ManualClock, accounts: Accounts
) -> None:
    """The snapshots a batch computed become true only at its COMMIT: when COMMIT fails (here a
    deferred trigger refuses one account's reservation), none of them reach the cache."""
    engine = create_engine(postgres_url)
    ledger = Ledger(engine, clock, LedgerSettings(), cache=LocalBalanceCache())
    account, bad = accounts("ok"), accounts("bad")
    try:
        await fund(ledger, account, 10)
        await fund(ledger, bad, 10)
        results = await reserve_with_one_account_refused(
            ledger, accounts, account, bad, at_commit=True
        )
        assert batcher(ledger).counters.failed_batches >= 1
        assert sum(isinstance(r, ReservationResult) for r in results) == 5
        for wallet, available in ((bad, 10), (account, 5)):
            cached = await ledger.check(wallet, "default")
            assert cached.from_cache and cached.available == available, (wallet, cached)
    finally:
        await ledger.close()
        await engine.dispose()


async def test_a_batch_stuck_behind_a_held_wallet_does_not_hold_up_other_accounts(
    pg_ledger: Ledger, postgres_url: str, accounts: Accounts
) -> None:
    stuck, free = accounts("stuck"), accounts("free")
    await fund(pg_ledger, stuck, 10)
    await fund(pg_ledger, free, 10)
    async with holding_wallet(postgres_url, stuck) as holding:
        waiting = asyncio.ensure_future(
            pg_ledger.reserve(ReserveCommand(stuck, "default", 1, "s"), CALLER)
        )
        await asyncio.sleep(0.1)
        # Another batch starts beside the stuck one and finishes while it still waits.
        async with asyncio.timeout(2):
            result = await pg_ledger.reserve(ReserveCommand(free, "default", 1, "f"), CALLER)
        assert result.reservation.amount == 1 and not waiting.done()
        await holding.rollback()
        assert (await waiting).reservation.amount == 1
    # The held wallet was skipped by the write without locks and waited for on the locking path.
    assert batcher(pg_ledger).counters.lost_compare_and_set == 1


async def test_calls_queued_behind_a_running_batch_schedule_one_recheck_not_one_each(
    pg_ledger: Ledger, postgres_url: str, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every submit used to schedule its own "may a second batch start?" timer while a batch ran:
    # hundreds of timers per second at load, each re-running the check (15% of a Reserve's CPU).
    stuck = accounts("stuck")
    await fund(pg_ledger, stuck, 100)
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    call_later = loop.call_later

    def counting_call_later(delay: float, callback: Callable[..., object], *args: object) -> object:
        if getattr(callback, "__self__", None) is batcher(pg_ledger):
            scheduled.append(callback)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", counting_call_later)
    async with holding_wallet(postgres_url, stuck) as holding:
        first = asyncio.ensure_future(
            pg_ledger.reserve(ReserveCommand(stuck, "default", 1, "first"), CALLER)
        )
        await asyncio.sleep(0)
        queued = [
            asyncio.ensure_future(
                pg_ledger.reserve(ReserveCommand(stuck, "default", 1, f"q{n}"), CALLER)
            )
            for n in range(50)
        ]
        await asyncio.sleep(0.1)  # past the stall: the queued calls went in a second batch
        await holding.rollback()
        results = await asyncio.gather(first, *queued)
    assert all(r.reservation.amount == 1 for r in results)
    # Two batches: the first, then the 50 queued behind it. A third when this machine stalled
    # longer than BATCH_STALL_SECONDS between the first batch's start and the next submit (a
    # virtual machine descheduled that long): the first queued call then starts a batch of its
    # own, and the other 49 wait for the next. Either way, one recheck timer.
    assert batcher(pg_ledger).counters.batches in (2, 3)
    assert len(scheduled) == 1, scheduled


async def test_concurrent_commits_and_releases_on_a_hot_wallet_settle_each_hold_once(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    account = accounts("hot-commit")
    await fund(pg_ledger, account, 30, "promo", priority=1)
    await fund(pg_ledger, account, 1000, "paid", priority=5)
    held = await asyncio.gather(
        *(
            pg_ledger.reserve(ReserveCommand(account, "default", 10, f"r{i}"), CALLER)
            for i in range(60)
        )
    )
    ids = [r.reservation.reservation_id for r in held]
    settled = await asyncio.gather(
        *(
            pg_ledger.commit(CommitCommand(account, rid, 7), CALLER)
            if i % 2 == 0
            else pg_ledger.release(ReleaseCommand(account, rid), CALLER)
            for i, rid in enumerate(ids)
        )
    )
    counters = resolver(pg_ledger).counters
    assert counters.largest_batch > 1 and counters.failed_batches == 0
    assert counters.handed_back == 0
    assert [r.reservation.status for r in settled] == [
        ReservationStatus.COMMITTED if i % 2 == 0 else ReservationStatus.RELEASED for i in range(60)
    ]
    # 30 commits of 7 consumed 210; everything else came back.
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (1030 - 210, 0)
    sequences = sorted(r.entry.sequence for r in settled)
    assert sequences == list(range(63, 123))  # 2 grants + 60 reserves, then one entry each
    # Repeats go the one-call path and return the stored result, entry and all.
    again = await asyncio.gather(
        *(
            pg_ledger.commit(CommitCommand(account, rid, 7), CALLER)
            if i % 2 == 0
            else pg_ledger.release(ReleaseCommand(account, rid), CALLER)
            for i, rid in enumerate(ids)
        )
    )
    assert again == settled
    assert resolver(pg_ledger).counters.handed_back == 60


async def test_what_a_batch_does_not_settle_gets_the_one_call_answer(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts
) -> None:
    account = accounts("odd")
    await fund(pg_ledger, account, 100)
    held = []
    for key in ("big", "short", "twice"):
        command = ReserveCommand(account, "default", 10, key, ttl_seconds=60)
        held.append((await pg_ledger.reserve(command, CALLER)).reservation.reservation_id)
    big, short, twice = held
    expiring = (
        await pg_ledger.reserve(ReserveCommand(account, "default", 5, "exp", ttl_seconds=1), CALLER)
    ).reservation.reservation_id
    clock.advance_seconds(2)
    results = await asyncio.gather(
        pg_ledger.commit(CommitCommand(account, big, 11), CALLER),  # above the hold
        pg_ledger.commit(CommitCommand(account, short, 4), CALLER),
        pg_ledger.commit(CommitCommand(account, twice, 3), CALLER),
        pg_ledger.commit(CommitCommand(account, twice, 3), CALLER),  # the same, at once
        pg_ledger.commit(CommitCommand(account, expiring), CALLER),  # past its TTL
        pg_ledger.commit(CommitCommand(account, "rsv_missing"), CALLER),
        return_exceptions=True,
    )
    assert isinstance(results[0], InvalidRequest)
    assert (
        not isinstance(results[1], BaseException) and results[1].reservation.amount_committed == 4
    )
    assert results[2] == results[3]
    assert isinstance(results[4], ReservationStateConflict)
    assert results[4].reason == "RESERVATION_EXPIRED"
    assert type(results[5]).__name__ == "ReservationNotFound"
    balance = await pg_ledger.check(account, "default", consistent=True)
    # 100 - 4 - 3 charged; the big hold is still pending; the expired one came back.
    assert (balance.available, balance.reserved) == (83, 10)


async def test_credits_returned_to_a_grant_past_its_expiry_expire_instead(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts
) -> None:
    account = accounts("promo-expiry")
    now = clock.now_us()
    await fund(pg_ledger, account, 10, "promo", priority=1, expires_at_us=now + 10_000_000)
    await fund(pg_ledger, account, 50, "paid", priority=5)
    held = await pg_ledger.reserve(
        ReserveCommand(account, "default", 20, "r", ttl_seconds=60), CALLER
    )
    clock.advance_seconds(11)  # the promo grant expires while its credits are held
    result = await pg_ledger.commit(
        CommitCommand(account, held.reservation.reservation_id, 12), CALLER
    )
    assert (
        resolver(pg_ledger).counters.requests >= 1 and resolver(pg_ledger).counters.handed_back == 0
    )
    # Burn-down consumes the promo slice first (10), then 2 of the paid one; the 8 unused paid
    # credits come back to the paid grant: 50 - 2 = 48 available.
    effects = {e.grant_id: e for e in result.entry.grant_effects}
    assert sorted(e.consumed_delta for e in effects.values()) == [2, 10]
    assert sum(e.expired_delta for e in effects.values()) == 0
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (48, 0)
    assert result.entry.available_after == 48
    # A release after expiry sends the held promo credits to `expired`, the rest back.
    later = clock.now_us()
    await fund(pg_ledger, account, 10, "promo2", priority=1, expires_at_us=later + 10_000_000)
    command = ReserveCommand(account, "default", 15, "r2", ttl_seconds=60)
    held = await pg_ledger.reserve(command, CALLER)
    clock.advance_seconds(11)
    released = await pg_ledger.release(
        ReleaseCommand(account, held.reservation.reservation_id), CALLER
    )
    assert sum(e.expired_delta for e in released.entry.grant_effects) == 10
    assert released.entry.available_after == 48
    assert resolver(pg_ledger).counters.handed_back == 0


async def test_the_journal_stores_exactly_the_entries_the_batches_returned(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    """Every column of every stored entry equals the entry the call got back (a batch that put
    a value in the wrong column would pass every balance check)."""
    account = accounts("columns")
    await fund(pg_ledger, account, 1000)
    returned = []
    held = await asyncio.gather(
        *(
            pg_ledger.reserve(
                ReserveCommand(
                    account, "default", 3, f"k{i}", ttl_seconds=60 + i, metadata={"n": str(i)}
                ),
                Caller(principal=f"svc:{i % 3}", action=f"act.{i}", request_id=f"req-{i}"),
            )
            for i in range(20)
        )
    )
    returned += [r.entry for r in held]
    settled = await asyncio.gather(
        *(
            pg_ledger.commit(
                CommitCommand(account, r.reservation.reservation_id, 2),
                Caller(principal="svc:commit", request_id=f"c-{i}"),
            )
            if i % 2
            else pg_ledger.release(ReleaseCommand(account, r.reservation.reservation_id), Caller())
            for i, r in enumerate(held)
        )
    )
    returned += [r.entry for r in settled]
    assert batcher(pg_ledger).counters.largest_batch > 1
    assert resolver(pg_ledger).counters.largest_batch > 1
    stored = {}
    token = ""
    while True:
        page = await read_history(
            pg_ledger.transactor, HistoryQuery(account, page_size=100, page_token=token)
        )
        stored.update({e.sequence: e for e in page.entries})
        token = page.next_page_token
        if not token:
            break
    for entry in returned:
        assert stored[entry.sequence] == entry
    # The reservations too, as a later read finds them.
    for result in settled:
        found = await pg_ledger.get_reservation(account, result.reservation.reservation_id)
        assert found == result.reservation


async def test_two_replicas_mixing_every_write_on_few_wallets_keep_every_credit(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts
) -> None:
    """Two ledgers (two replicas' batchers) Reserve, Commit, Release and grant at once on three
    wallets, so batches lose their compare-and-set to each other and to the one-call path
    again and again. Every credit stays accounted for: granted = available + held + consumed,
    each hold settles once, and the audit (in the fixture) replays the journal clean."""
    other = Ledger(pg_ledger.engine, clock, LedgerSettings())
    ledgers = (pg_ledger, other)
    wallets = [accounts(f"mix{i}") for i in range(3)]
    for account in wallets:
        await fund(pg_ledger, account, 40)
    rng = __import__("random").Random(7)
    granted = {account: 40 for account in wallets}

    async def flow(n: int) -> tuple[str, int]:
        """One caller's work; returns (account, credits it consumed)."""
        ledger, account = ledgers[n % 2], rng.choice(wallets)
        if n % 7 == 0:
            await fund(ledger, account, 5, f"top{n}")
            granted[account] += 5
            return account, 0
        try:
            held = await ledger.reserve(ReserveCommand(account, "default", 3, f"r{n}"), CALLER)
        except InsufficientCredits:
            return account, 0
        rid = held.reservation.reservation_id
        resolver_ledger = ledgers[(n + 1) % 2]  # settled through the other replica
        if n % 3 == 0:
            await resolver_ledger.release(ReleaseCommand(account, rid), CALLER)
            return account, 0
        settled = await resolver_ledger.commit(CommitCommand(account, rid, 2), CALLER)
        return account, settled.reservation.amount_committed

    try:
        results = await asyncio.gather(*(flow(n) for n in range(240)))
    finally:
        await other.close()
    consumed = Counter[str]()
    for account, amount in results:
        consumed[account] += amount
    for account in wallets:
        balance = await pg_ledger.check(account, "default", consistent=True)
        assert balance.reserved == 0, account
        assert balance.available + consumed[account] == granted[account], account
    counters = [batcher(ledger).counters for ledger in ledgers]
    assert sum(c.largest_batch > 1 for c in counters) >= 1
    # The point of the mix: batches did lose wallets to the other replica and decided again.
    assert sum(c.lost_compare_and_set for c in counters) >= 1


@asynccontextmanager
async def saturated_loop() -> AsyncIterator[None]:
    """Something else keeps the event loop's thread on the CPU all the time, as a flood of
    calls would: to the batchers, the server is saturated."""
    stop = asyncio.Event()

    async def spin() -> None:
        while not stop.is_set():
            busy_until = time.perf_counter() + 0.002
            while time.perf_counter() < busy_until:
                pass
            await asyncio.sleep(0)

    spinner = asyncio.create_task(spin())
    try:
        yield
    finally:
        stop.set()
        await spinner


async def test_a_saturated_server_lets_batches_wait_to_fill_and_an_idle_one_never_does(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    account = accounts("fill")
    await fund(pg_ledger, account, 1_000)
    counters = batcher(pg_ledger).counters

    async def wave(name: str) -> None:
        results = await asyncio.gather(
            *(outcome(pg_ledger, account, 1, f"{name}-{i}") for i in range(20))
        )
        assert set(results) == {"OK"}

    # Idle between waves: the loop's thread is mostly off the CPU, so no batch waits.
    for n in range(3):
        await asyncio.sleep(0.05)
        await wave(f"idle{n}")
    assert counters.filled == 0 and counters.largest_batch >= limits.BATCH_FILL_AFTER_CALLS
    assert batcher(pg_ledger).loop_cpu_share < limits.BATCH_FILL_CPU_SHARE_MIN

    # Saturated: batches after a big one wait to fill.
    async with saturated_loop():
        for n in range(5):
            await wave(f"busy{n}")
    assert counters.filled >= 1 and counters.failed_batches == 0
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (1_000 - 160, 160)


async def test_a_batch_waiting_to_fill_starts_at_once_when_the_batcher_closes(
    postgres_url: str, clock: ManualClock, accounts: Accounts
) -> None:
    """close() neither waits out a fill wait nor spins on it: the waiting callers are answered."""
    engine = create_engine(postgres_url)
    try:
        # A wait far longer than the test: had the timer ended it, `filled` would count it.
        ledger = Ledger(
            engine, clock, LedgerSettings(batch_fill_wait_ms=limits.BATCH_FILL_WAIT_MS_MAX)
        )
        account = accounts("closing")
        await fund(ledger, account, 100)
        reserving = batcher(ledger)
        async with saturated_loop():
            for n in range(10):
                first = await asyncio.gather(
                    *(outcome(ledger, account, 1, f"w{n}-{i}") for i in range(20))
                )
                assert set(first) == {"OK"}
                calls = asyncio.gather(
                    *(outcome(ledger, account, 1, f"c{n}-{i}") for i in range(3))
                )
                await asyncio.sleep(0)
                if reserving._filling_until is not None:
                    break
                await calls
            assert reserving._filling_until is not None, "a batch waits to fill"
            filled_before = reserving.counters.filled
            await ledger.close()
            assert await calls == ["OK"] * 3
        assert reserving.counters.filled == filled_before and reserving._filling_until is None
    finally:
        await engine.dispose()


def test_the_fill_wait_is_bounded() -> None:
    with pytest.raises(ValueError, match="fill wait"):
        LedgerSettings(batch_fill_wait_ms=limits.BATCH_FILL_WAIT_MS_MAX + 1)
    with pytest.raises(ValueError, match="fill wait"):
        LedgerSettings(batch_fill_wait_ms=-1)


def _link_socket(socket: pathlib.Path, link: pathlib.Path) -> bool:
    if not socket.exists():
        return False
    link.symlink_to(socket)
    return True


async def test_the_ledger_and_its_batches_reach_a_local_postgres_through_its_unix_socket(
    postgres_url: str, clock: ManualClock, accounts: Accounts, tmp_path: pathlib.Path
) -> None:
    # Operators of a co-located Postgres connect through its socket (docs/operations.md): the
    # URL names the socket's directory as `host` in the query, and every pool (SQLAlchemy's and
    # the batches' own asyncpg pools) must take it from there.
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        directories = await admin.fetchval("SHOW unix_socket_directories")
        port = await admin.fetchval("SHOW port")
    finally:
        await admin.close()
    directory = next((d.strip() for d in directories.split(",") if d.strip()), "")
    # The socket under another directory and port, where no client would look by itself: a
    # pool that dropped either from the URL would not find it.
    if not _link_socket(pathlib.Path(directory, f".s.PGSQL.{port}"), tmp_path / ".s.PGSQL.6543"):
        pytest.skip(f"Postgres's socket is not on this machine ({directory!r})")
    url = make_url(postgres_url).set(
        host=None, port=None, query={"host": str(tmp_path), "port": "6543"}
    )
    engine = create_engine(url.render_as_string(hide_password=False))
    ledger = Ledger(engine, clock, LedgerSettings())
    try:
        account = accounts("socket")
        await fund(ledger, account, 10)
        results = await asyncio.gather(*(outcome(ledger, account, 1, f"s{i}") for i in range(12)))
        assert Counter(results) == {"OK": 10, "INSUFFICIENT_CREDITS": 2}
        assert batcher(ledger).counters.largest_batch > 1
        async with engine.connect() as conn:
            # No client address: this session and the batches' came through the socket.
            rows = (
                await conn.exec_driver_sql(
                    "SELECT application_name, client_addr IS NULL FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name LIKE 'credits-%'"
                )
            ).all()
        assert {name for name, _ in rows} >= {"credits-server", "credits-server-batches"}
        assert all(through_socket for _, through_socket in rows), rows
        await ledger.close()
        report = await audit(engine, accounts.prefix)  # type: ignore[attr-defined]
        assert report.clean, "\n".join(map(str, report.mismatches))
    finally:
        await engine.dispose()


# ---- lever 21: a batch decides on this process's copy of a wallet it wrote --------------------


def copies(ledger: Ledger) -> WalletCopies:
    return batcher(ledger).copies


async def reserve(ledger: Ledger, account: str, amount: int, key: str) -> ReservationResult:
    return await ledger.reserve(ReserveCommand(account, "default", amount, key), CALLER)


@pytest.fixture
async def replica(pg_ledger: Ledger, clock: ManualClock) -> AsyncIterator[Ledger]:
    """Another replica on the same database: its writes are invisible to pg_ledger's copies."""
    other = Ledger(pg_ledger.engine, clock, LedgerSettings(batch_writes=False))
    yield other
    await other.close()


async def test_a_wallet_this_process_wrote_is_reserved_again_on_its_copy_with_the_same_burn_down(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    account = accounts("copied")
    await fund(pg_ledger, account, 5, "promo", priority=1)
    await fund(pg_ledger, account, 100, "paid", priority=5)
    first = await reserve(pg_ledger, account, 3, "r1")  # read, written, copy kept
    assert copies(pg_ledger).decided == 0 and len(copies(pg_ledger)) == 1
    second = await reserve(pg_ledger, account, 3, "r2")  # decided on the copy
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 0)
    assert [s.amount for s in first.reservation.slices] == [3]
    # The rest of the promo lot first, then the paid grant: burn-down order on the copy too.
    assert [s.amount for s in second.reservation.slices] == [2, 1]
    assert (second.entry.sequence, second.entry.available_after) == (4, 99)
    assert batcher(pg_ledger).counters.lost_compare_and_set == 0
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (99, 6)
    # A replay of either key answers what was stored.
    assert await reserve(pg_ledger, account, 3, "r2") == second


async def test_a_copy_behind_another_replicas_grant_is_decided_again_on_what_is_stored(
    pg_ledger: Ledger, replica: Ledger, accounts: Accounts
) -> None:
    """Here the copy says 2 are left; the other replica granted 10 more. The write on the copy
    finds the wallet moved and writes nothing; the read path decides on 12."""
    account = accounts("behind")
    await fund(pg_ledger, account, 5)
    await reserve(pg_ledger, account, 3, "r1")
    await fund(replica, account, 10, "elsewhere")
    result = await reserve(pg_ledger, account, 1, "r2")
    assert (result.entry.sequence, result.entry.available_after) == (4, 11)
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 1)
    # The copy's loss is counted as a reread, not as a retry on the locking path.
    assert batcher(pg_ledger).counters.lost_compare_and_set == 0
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (11, 4)


async def test_a_refusal_is_never_decided_on_a_copy(
    pg_ledger: Ledger, replica: Ledger, accounts: Accounts
) -> None:
    """A refusal is stored for good under its key: on a copy that says 2 are left, a Reserve of
    8 would be refused although the other replica's grant made 12. It goes to the read path."""
    account = accounts("refusal")
    await fund(pg_ledger, account, 5)
    await reserve(pg_ledger, account, 3, "r1")
    await fund(replica, account, 10, "elsewhere")
    result = await reserve(pg_ledger, account, 8, "r2")
    assert result.entry.available_after == 4
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 1)
    # Nothing was written from the copy, not even the refusal's key.
    assert batcher(pg_ledger).counters.lost_compare_and_set == 0
    assert await reserve(pg_ledger, account, 8, "r2") == result


async def test_an_account_locked_by_another_replica_refuses_although_the_copy_is_current(
    pg_ledger: Ledger, replica: Ledger, accounts: Accounts
) -> None:
    """Locking an account does not move its wallets' sequences: the write on a copy checks the
    status itself."""
    account = accounts("locked")
    await fund(pg_ledger, account, 10)
    await reserve(pg_ledger, account, 1, "r1")
    await replica.set_account_status(account, AccountStatus.LOCKED, "test", CALLER)
    assert await outcome(pg_ledger, account, 1, "r2") == "ACCOUNT_LOCKED"
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 1)
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (9, 1)


async def test_a_key_stored_by_another_replica_is_answered_from_what_it_stored(
    pg_ledger: Ledger, replica: Ledger, accounts: Accounts
) -> None:
    """The other replica stored a refusal under `k` (the wallet did not move). Here `k` comes
    again with another amount, which the copy would allow: the write fails whole on the key,
    and the call gets the answer the key's first request fixed."""
    account = accounts("replay")
    await fund(pg_ledger, account, 10)
    await reserve(pg_ledger, account, 1, "r1")
    assert await outcome(replica, account, 100, "k") == "INSUFFICIENT_CREDITS"
    with pytest.raises(IdempotencyKeyReused):
        await reserve(pg_ledger, account, 1, "k")
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 1)
    assert await outcome(pg_ledger, account, 100, "k") == "INSUFFICIENT_CREDITS"
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (9, 1)


async def test_a_commit_batch_leaves_a_copy_the_next_reserve_decides_on(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    """Reserve → Commit → Reserve, the metered call's usual path: the Commit batch knows the
    wallet as it left it (its lots, live or not), so the next Reserve needs no read either."""
    account = accounts("commit")
    await fund(pg_ledger, account, 10)
    held = await reserve(pg_ledger, account, 4, "r1")
    await pg_ledger.commit(CommitCommand(account, held.reservation.reservation_id, 1), CALLER)
    assert resolver(pg_ledger).counters.batches == 1
    result = await reserve(pg_ledger, account, 2, "r2")
    assert (copies(pg_ledger).decided, copies(pg_ledger).reread) == (1, 0)
    # 10 granted, 1 consumed, 3 of the hold returned: 9, then 2 reserved.
    assert (result.entry.sequence, result.entry.available_after) == (4, 7)
    balance = await pg_ledger.check(account, "default", consistent=True)
    assert (balance.available, balance.reserved) == (7, 2)


async def test_a_grant_here_drops_the_copy_it_makes_stale(
    pg_ledger: Ledger, accounts: Accounts
) -> None:
    """AddCredits goes the one-call path, which keeps no copy: the copy it made stale goes, so
    the next Reserve reads instead of writing on it and losing."""
    account = accounts("grant")
    await fund(pg_ledger, account, 10)
    await reserve(pg_ledger, account, 4, "r1")
    await fund(pg_ledger, account, 5, "more")
    assert len(copies(pg_ledger)) == 0
    result = await reserve(pg_ledger, account, 2, "r2")
    assert copies(pg_ledger).decided == 0
    assert batcher(pg_ledger).counters.lost_compare_and_set == 0
    assert (result.entry.sequence, result.entry.available_after) == (4, 9)


async def test_a_copy_says_nothing_past_a_grants_expiry(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts
) -> None:
    account = accounts("expiry")
    soon = clock.now_us() + 1_000_000
    await fund(pg_ledger, account, 10, "soon", priority=1, expires_at_us=soon)
    await fund(pg_ledger, account, 10, "later", priority=5)
    first = await reserve(pg_ledger, account, 1, "r1")
    clock.advance_seconds(2)
    second = await reserve(pg_ledger, account, 1, "r2")
    assert copies(pg_ledger).decided == 0
    assert first.reservation.slices[0].grant_id != second.reservation.slices[0].grant_id
    assert second.entry.available_after == 9


async def test_two_replicas_reserving_on_their_copies_of_the_same_wallets_spend_each_credit_once(
    pg_ledger: Ledger, clock: ManualClock, accounts: Accounts
) -> None:
    """Both replicas keep copies of the same wallets and write on them at once, so copies fall
    behind the other replica's writes again and again. Every credit is reserved at most once."""
    other = Ledger(pg_ledger.engine, clock, LedgerSettings())
    wallets = [accounts(f"both{i}") for i in range(3)]
    for account in wallets:
        await fund(pg_ledger, account, 100)
    try:
        for wave in range(6):
            calls = [
                outcome((pg_ledger, other)[n % 2], wallets[n % 3], 1 + n % 4, f"w{wave}-{n}")
                for n in range(30)
            ]
            await asyncio.gather(*calls)
    finally:
        await other.close()
    for account in wallets:
        balance = await pg_ledger.check(account, "default", consistent=True)
        assert balance.available + balance.reserved == 100, account
        assert balance.available >= 0
    both = [copies(pg_ledger), copies(other)]
    assert sum(c.decided for c in both) >= 1
    assert sum(c.reread for c in both) >= 1
