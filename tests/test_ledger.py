"""Ledger behaviour of DESIGN.md, on SQLite and Postgres, with a clock moved by hand."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from store import limits
from store.audit import audit
from store.backlog import read_backlog
from store.clock import ManualClock
from store.errors import (
    AccountLocked,
    BalanceLimitExceeded,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidRequest,
    ReservationNotFound,
    ReservationStateConflict,
)
from store.history import read_history
from store.ledger import Ledger
from store.model import (
    AccountStatus,
    AddCreditsCommand,
    Caller,
    CommitCommand,
    EntryKind,
    GrantSource,
    HistoryQuery,
    ReleaseCommand,
    ReservationStatus,
    ReserveCommand,
)
from store.schema import grants

Accounts = Callable[[str], str]
CALLER = Caller(principal="svc:test", action="test.run", request_id="req-1")
SECOND_US = limits.MICROSECONDS_PER_SECOND


async def grant(ledger: Ledger, account: str, amount: int, key: str, **kw: object) -> str:
    command = AddCreditsCommand(
        account,
        kw.pop("credit_type", "default"),
        amount,
        key,  # type: ignore[arg-type]
        kw.pop("source", GrantSource.PURCHASE),
        **kw,
    )  # type: ignore[arg-type]
    return (await ledger.add_credits(command, CALLER)).grant.grant_id


async def reserve(ledger: Ledger, account: str, amount: int, key: str, **kw: object) -> str:
    result = await ledger.reserve(ReserveCommand(account, "default", amount, key, **kw), CALLER)  # type: ignore[arg-type]
    return result.reservation.reservation_id


async def drain(sweep: Callable[[], Awaitable[int]]) -> None:
    """Sweeps until nothing is left. The database is shared with other tests, whose holds a
    moved clock also expires, so a pass's count says nothing about this test's accounts."""
    for _ in range(1000):
        if await sweep() == 0:
            return
    raise AssertionError("the sweeper never ran dry")


async def entries_of_kind(ledger: Ledger, account: str, kind: EntryKind) -> list[int]:
    page = await read_history(ledger.transactor, HistoryQuery(account, kinds=(kind,)))
    return [e.amount for e in page.entries]


async def available(ledger: Ledger, account: str, credit_type: str = "default") -> int:
    return (await ledger.check(account, credit_type)).available


# ---- idempotency ----


async def test_add_credits_replay_returns_the_identical_result_and_changes_nothing(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    command = AddCreditsCommand(a, "default", 100, "buy-1", GrantSource.PURCHASE)
    first = await ledger.add_credits(command, CALLER)
    again = await ledger.add_credits(command, CALLER)
    assert again == first
    assert await available(ledger, a) == 100


async def test_insufficient_outcome_is_final_for_its_key_even_after_credits_arrive(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 5, "g1")
    with pytest.raises(InsufficientCredits) as first:
        await reserve(ledger, a, 10, "r1")
    await grant(ledger, a, 100, "g2")
    with pytest.raises(InsufficientCredits) as replay:
        await reserve(ledger, a, 10, "r1")
    assert (
        (replay.value.required, replay.value.available)
        == (10, 5)
        == (first.value.required, first.value.available)
    )
    assert (await ledger.check(a, "default")).reserved == 0
    await reserve(ledger, a, 10, "r2")  # a new key sees the new credits


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"amount": 11}, "amount"),
        ({"ttl_seconds": 60}, "ttl_seconds"),
        ({"metadata": {"k": "v"}}, "metadata"),
        ({"credit_type": "ai"}, "credit_type"),
    ],
)
async def test_reusing_a_reserve_key_for_another_request_names_the_field(
    ledger: Ledger, accounts: Accounts, changed: dict[str, object], field: str
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    await ledger.reserve(ReserveCommand(a, "default", 10, "r1"), CALLER)
    base = {"account_id": a, "credit_type": "default", "amount": 10, "idempotency_key": "r1"}
    with pytest.raises(IdempotencyKeyReused) as error:
        await ledger.reserve(ReserveCommand(**{**base, **changed}), CALLER)  # type: ignore[arg-type]
    assert error.value.field == field


async def test_a_key_used_for_add_credits_cannot_be_reused_for_reserve(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "same-key")
    with pytest.raises(IdempotencyKeyReused) as error:
        await reserve(ledger, a, 1, "same-key")
    assert error.value.field == "operation"


async def test_invalid_requests_are_not_stored_under_their_key(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    with pytest.raises(InvalidRequest):
        await reserve(ledger, a, 10, "r1", ttl_seconds=10**6)
    await reserve(ledger, a, 10, "r1")  # the key is still free


# ---- commit, release, TTL ------------------------------------------------------------------------


async def test_commit_charges_part_and_returns_the_rest(ledger: Ledger, accounts: Accounts) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1")
    result = await ledger.commit(CommitCommand(a, rid, 15), CALLER)
    assert (result.reservation.amount_committed, result.reservation.amount_released) == (15, 25)
    assert result.entry.amount == -15
    balance = await ledger.check(a, "default")
    assert (balance.available, balance.reserved) == (85, 0)


async def test_commit_without_amount_charges_everything(ledger: Ledger, accounts: Accounts) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1")
    result = await ledger.commit(CommitCommand(a, rid), CALLER)
    assert result.reservation.amount_committed == 40
    assert await available(ledger, a) == 60


async def test_commit_again_with_the_same_amount_returns_the_same_result(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1")
    first = await ledger.commit(CommitCommand(a, rid, 30), CALLER)
    assert await ledger.commit(CommitCommand(a, rid, 30), CALLER) == first
    with pytest.raises(ReservationStateConflict) as error:
        await ledger.commit(CommitCommand(a, rid, 31), CALLER)
    assert error.value.reason == "RESERVATION_COMMITTED"
    with pytest.raises(ReservationStateConflict) as error:
        await ledger.release(ReleaseCommand(a, rid), CALLER)
    assert error.value.reason == "RESERVATION_COMMITTED"
    assert await available(ledger, a) == 70


async def test_commit_above_the_reserved_amount_is_invalid(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1")
    with pytest.raises(InvalidRequest) as error:
        await ledger.commit(CommitCommand(a, rid, 41), CALLER)
    assert error.value.violations[0].field == "amount"
    assert (await ledger.check(a, "default")).reserved == 40


async def test_release_is_repeatable_and_a_released_hold_cannot_be_committed(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1")
    first = await ledger.release(ReleaseCommand(a, rid), CALLER)
    assert await ledger.release(ReleaseCommand(a, rid), CALLER) == first
    with pytest.raises(ReservationStateConflict) as error:
        await ledger.commit(CommitCommand(a, rid), CALLER)
    assert error.value.reason == "RESERVATION_RELEASED"
    assert await available(ledger, a) == 100


async def test_unknown_reservation_is_not_found(ledger: Ledger, accounts: Accounts) -> None:
    with pytest.raises(ReservationNotFound):
        await ledger.commit(CommitCommand(accounts("a"), "rsv_nope"), CALLER)


async def test_commit_after_ttl_fails_even_before_sweeper_runs(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1", ttl_seconds=10)
    clock.advance_seconds(10)  # exactly at expires_at: already too late
    with pytest.raises(ReservationStateConflict) as error:
        await ledger.commit(CommitCommand(a, rid), CALLER)
    assert error.value.reason == "RESERVATION_EXPIRED"
    reservation = await ledger.get_reservation(a, rid)
    assert reservation is not None and reservation.status is ReservationStatus.EXPIRED
    assert reservation.amount_expired == 40
    assert await available(ledger, a) == 100
    await drain(ledger.sweep_expired_holds)  # nothing left for the sweeper to do here
    assert await entries_of_kind(ledger, a, EntryKind.HOLD_EXPIRY) == [0]


async def test_commit_just_before_ttl_succeeds(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1", ttl_seconds=10)
    clock.advance_seconds(9.999999)
    assert (await ledger.commit(CommitCommand(a, rid), CALLER)).reservation.amount_committed == 40


async def test_releasing_an_expired_reservation_reports_it_expired(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1", ttl_seconds=5)
    clock.advance_seconds(6)
    await drain(ledger.sweep_expired_holds)
    result = await ledger.release(ReleaseCommand(a, rid), CALLER)
    assert result.reservation.status is ReservationStatus.EXPIRED
    assert result.entry.kind is EntryKind.HOLD_EXPIRY
    assert result.entry.principal == "system"


async def test_hold_sweeper_returns_credits_once(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    await reserve(ledger, a, 40, "r1", ttl_seconds=5)
    await reserve(ledger, a, 10, "r2", ttl_seconds=50)
    clock.advance_seconds(6)
    await drain(ledger.sweep_expired_holds)
    await drain(ledger.sweep_expired_holds)
    assert await entries_of_kind(ledger, a, EntryKind.HOLD_EXPIRY) == [0]
    balance = await ledger.check(a, "default")
    assert (balance.available, balance.reserved) == (90, 10)


# ---- grant expiry ----


async def test_held_credits_survive_their_grants_expiry_and_what_returns_expires_at_once(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    now = clock.now_us()
    promo = await grant(
        ledger, a, 50, "g1", source=GrantSource.PROMOTION, expires_at_us=now + 60 * SECOND_US
    )
    durable = await grant(ledger, a, 100, "g2")
    rid = await reserve(ledger, a, 70, "r1", ttl_seconds=300)  # 50 promo + 20 durable
    clock.advance_seconds(120)  # the promo grant has expired; the hold is still valid
    await drain(ledger.sweep_expired_grants)
    assert await entries_of_kind(ledger, a, EntryKind.GRANT_EXPIRY) == []  # all 50 are held
    result = await ledger.commit(CommitCommand(a, rid, 30), CALLER)
    effects = {e.grant_id: e for e in result.entry.grant_effects}
    # Burn-down consumes the expiring promo first; its unused 20 expire at once.
    assert (effects[promo].consumed_delta, effects[promo].expired_delta) == (30, 20)
    assert (effects[durable].consumed_delta, effects[durable].remaining_delta) == (0, 20)
    promo_grant = await ledger.get_grant(a, promo)
    assert promo_grant is not None
    assert (promo_grant.remaining, promo_grant.held, promo_grant.consumed, promo_grant.expired) == (
        0,
        0,
        30,
        20,
    )
    assert await available(ledger, a) == 100


async def test_grant_sweeper_expires_only_the_remaining_part(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    gid = await grant(ledger, a, 50, "g1", expires_at_us=clock.now_us() + 60 * SECOND_US)
    await reserve(ledger, a, 20, "r1", ttl_seconds=600)
    clock.advance_seconds(61)
    assert await available(ledger, a) == 0  # past expiry it is not spendable, swept or not
    await drain(ledger.sweep_expired_grants)
    await drain(ledger.sweep_expired_grants)
    g = await ledger.get_grant(a, gid)
    assert g is not None and (g.remaining, g.held, g.expired) == (0, 20, 30)
    history = await read_history(
        ledger.transactor, HistoryQuery(a, kinds=(EntryKind.GRANT_EXPIRY,))
    )
    assert [e.amount for e in history.entries] == [-30]


async def expiry_settled(ledger: Ledger, account: str) -> dict[str, bool]:
    async with ledger.engine.connect() as conn:
        result = await conn.execute(
            select(grants.c.grant_id, grants.c.expiry_settled).where(grants.c.account_id == account)
        )
        return {grant_id: bool(settled) for grant_id, settled in result}


async def test_grant_sweeper_settles_each_expired_grant_once_nothing_of_it_is_left(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    """The sweeper's index leaves out settled grants (not those with remaining = 0: that would
    make every Reserve's grant update write to it, store/schema.py). A grant spent out before its
    expiry is settled without an entry; one with held credits only once its holds resolve."""
    a = accounts("a")
    expires_at_us = clock.now_us() + 60 * SECOND_US
    spent = await grant(ledger, a, 10, "spent", expires_at_us=expires_at_us)
    await ledger.commit(CommitCommand(a, await reserve(ledger, a, 10, "r-spent")), CALLER)
    held = await grant(ledger, a, 50, "held", expires_at_us=expires_at_us + 1)
    hold = await reserve(ledger, a, 20, "r-held", ttl_seconds=600)
    untouched = await grant(ledger, a, 5, "untouched", expires_at_us=expires_at_us + 2)
    durable = await grant(ledger, a, 7, "durable")
    clock.advance_seconds(61)

    before = await read_backlog(ledger.transactor, clock.now_us())
    assert before.oldest_overdue_grant_expires_at_us is not None
    assert before.oldest_overdue_grant_expires_at_us <= expires_at_us + 1
    await drain(ledger.sweep_expired_grants)
    assert await expiry_settled(ledger, a) == {
        spent: True,  # nothing left: settled, and no GRANT_EXPIRY entry
        held: False,  # 30 expired, 20 still held by a pending reservation
        untouched: True,
        durable: False,  # never expires: the sweeper never looks at it
    }
    assert sorted(await entries_of_kind(ledger, a, EntryKind.GRANT_EXPIRY)) == [-30, -5]
    after = await read_backlog(ledger.transactor, clock.now_us())
    assert after.oldest_overdue_grant_expires_at_us is None  # the held grant has nothing to expire

    await ledger.commit(CommitCommand(a, hold, 15), CALLER)  # the other 5 expire at once
    await drain(ledger.sweep_expired_grants)
    assert (await expiry_settled(ledger, a))[held] is True
    g = await ledger.get_grant(a, held)
    assert g is not None and (g.remaining, g.held, g.consumed, g.expired) == (0, 0, 15, 35)
    assert await available(ledger, a) == 7


async def test_future_grants_are_not_spendable_until_effective(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 50, "g1", effective_at_us=clock.now_us() + 3600 * SECOND_US)
    with pytest.raises(InsufficientCredits):
        await reserve(ledger, a, 1, "r1")
    clock.advance_seconds(3600)
    await reserve(ledger, a, 50, "r2")


# ---- accounts and wallets ----


async def test_a_locked_account_cannot_reserve_but_reads_and_grants_work(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 10, "r0")
    await ledger.set_account_status(a, AccountStatus.LOCKED)
    with pytest.raises(AccountLocked):
        await reserve(ledger, a, 10, "r1")
    await grant(ledger, a, 5, "g2")
    await ledger.commit(CommitCommand(a, rid), CALLER)  # holds made before the lock resolve
    balance = await ledger.check(a, "default")
    assert (balance.available, balance.account_status) == (95, AccountStatus.LOCKED)


async def test_credit_types_never_mix(ledger: Ledger, accounts: Accounts) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1", credit_type="ai")
    with pytest.raises(InsufficientCredits):
        await reserve(ledger, a, 1, "r1")
    assert await available(ledger, a, "ai") == 100


async def test_a_wallet_holds_at_most_the_balance_limit(
    ledger: Ledger, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit takes 1000 maximal grants to reach; the rule is the same at 3.
    monkeypatch.setattr(limits, "WALLET_BALANCE_MAX", 3 * limits.AMOUNT_MAX)
    a = accounts("a")
    for i in range(3):
        await grant(ledger, a, limits.AMOUNT_MAX, f"g{i}")
    with pytest.raises(BalanceLimitExceeded):
        await grant(ledger, a, 1, "one-more")


# ---- journal and history ----


async def test_journal_records_who_spent_what_on_which_action(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 10, "r1")
    await ledger.commit(CommitCommand(a, rid), Caller(principal="svc:billing", request_id="req-9"))
    page = await read_history(ledger.transactor, HistoryQuery(a, reservation_id=rid))
    commit, reserve_entry = page.entries
    assert (commit.kind, commit.principal, commit.action, commit.request_id) == (
        EntryKind.COMMIT,
        "svc:billing",
        "test.run",
        "req-9",
    )
    assert (reserve_entry.kind, reserve_entry.principal) == (EntryKind.RESERVE, "svc:test")


async def test_history_pages_newest_first_with_filters(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    for i in range(7):
        await grant(ledger, a, 10, f"g{i}", credit_type="ai" if i % 2 else "default")
        clock.advance_seconds(1)
    seen: list[tuple[str, int]] = []
    token = ""
    while True:
        page = await read_history(ledger.transactor, HistoryQuery(a, page_size=3, page_token=token))
        seen += [(e.credit_type, e.created_at_us) for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 7
    assert [t for _, t in seen] == sorted((t for _, t in seen), reverse=True)
    ai_only = await read_history(ledger.transactor, HistoryQuery(a, credit_type="ai"))
    assert [e.sequence for e in ai_only.entries] == [3, 2, 1]
    with pytest.raises(InvalidRequest):
        first = await read_history(ledger.transactor, HistoryQuery(a, page_size=2))
        await read_history(
            ledger.transactor, HistoryQuery(a, credit_type="ai", page_token=first.next_page_token)
        )


async def test_the_journal_refuses_updates_and_deletes(ledger: Ledger, accounts: Accounts) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    for statement in (
        "UPDATE journal SET amount = 1 WHERE account_id = :a",
        "DELETE FROM journal WHERE account_id = :a",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with ledger.engine.begin() as conn:
                await conn.execute(text(statement), {"a": a})


async def test_audit_reports_a_grant_that_differs_from_its_journal(
    ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("tampered")
    gid = await grant(ledger, a, 100, "g1")
    async with ledger.engine.begin() as conn:
        # Keeps every CHECK constraint (parts still sum to amount) yet is not what happened.
        await conn.execute(
            update(grants)
            .where(grants.c.account_id == a, grants.c.grant_id == gid)
            .values(remaining=90, consumed=10)
        )
    report = await audit(ledger.engine, a)
    assert not report.clean
    assert any(gid in m.subject and "remaining" in m.detail for m in report.mismatches)
    async with ledger.engine.begin() as conn:  # put it back so the fixture's audit is clean
        await conn.execute(
            update(grants)
            .where(grants.c.account_id == a, grants.c.grant_id == gid)
            .values(remaining=100, consumed=0)
        )


async def test_idempotency_keys_are_kept_for_the_retention_then_pruned(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    command = AddCreditsCommand(a, "default", 10, "k", GrantSource.PURCHASE)
    first = await ledger.add_credits(command, CALLER)
    clock.advance_seconds(ledger.settings.idempotency_retention_seconds - 1)
    await ledger.prune_idempotency_keys()
    assert await ledger.add_credits(command, CALLER) == first
    clock.advance_seconds(2)
    while await ledger.prune_idempotency_keys():
        pass
    assert (await ledger.add_credits(command, CALLER)).grant != first.grant  # a new grant


async def test_releasing_after_the_ttl_before_any_sweep_returns_the_expired_hold(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(ledger, a, 100, "g1")
    rid = await reserve(ledger, a, 40, "r1", ttl_seconds=5)
    clock.advance_seconds(5)
    first = await ledger.release(ReleaseCommand(a, rid), CALLER)
    assert (first.reservation.status, first.entry.kind) == (
        ReservationStatus.EXPIRED,
        EntryKind.HOLD_EXPIRY,
    )
    assert await ledger.release(ReleaseCommand(a, rid), CALLER) == first
    assert await available(ledger, a) == 100


async def test_a_grant_retried_after_its_expiry_returns_the_first_outcome(
    ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    command = AddCreditsCommand(
        a, "default", 10, "g1", GrantSource.PROMOTION, expires_at_us=clock.now_us() + 10 * SECOND_US
    )
    first = await ledger.add_credits(command, CALLER)
    clock.advance_seconds(10)
    assert await ledger.add_credits(command, CALLER) == first
    with pytest.raises(InvalidRequest) as error:  # a new key with the same times is untimely
        await ledger.add_credits(
            AddCreditsCommand(
                a, "default", 10, "g2", GrantSource.PROMOTION, expires_at_us=command.expires_at_us
            ),
            CALLER,
        )
    assert error.value.violations[0].field == "expires_at"
    await ledger.add_credits(  # and the rejected key was not used up
        AddCreditsCommand(a, "default", 10, "g2", GrantSource.PROMOTION), CALLER
    )
