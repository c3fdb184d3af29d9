"""The ledger's operations: each one is one transaction that locks its wallet row first.

Lock order, everywhere: idempotency key (unique-index insert) -> account row (insert only) ->
wallet row (FOR UPDATE) -> the wallet's grants and reservations. A single order means no
deadlock between our own transactions; the wallet row makes every change to a wallet's grants
serial, so burn-down decisions are always taken on the latest state.

The clock is read after the wallet lock is held, so "now" is the instant the decision is made,
not when the request started waiting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, and_, bindparam, func, insert, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from store import codec, idempotency, limits, rows, validation
from store.batch_pool import BatchConnections
from store.batching import Admission, Batcher, Publish, Published
from store.burndown import NO_SCHEDULED_CHANGE_US, Lot, allocate, consume
from store.cache import AccountSnapshot, BalanceCache, WalletSnapshot
from store.clock import Clock, SystemClock
from store.errors import (
    AccountLocked,
    BalanceLimitExceeded,
    BusinessFailure,
    FieldViolation,
    GrantNotFound,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    ReservationNotFound,
    ReservationStateConflict,
)
from store.ids import new_id
from store.model import (
    SYSTEM_PRINCIPAL,
    AccountStatus,
    AccountStatusChange,
    AddCreditsCommand,
    Balance,
    Caller,
    ClawBackCommand,
    ClawBackResult,
    CommitCommand,
    EntryKind,
    Grant,
    GrantEffect,
    GrantResult,
    JournalEntry,
    ReleaseCommand,
    Reservation,
    ReservationResult,
    ReservationStatus,
    ReserveCommand,
)
from store.reserve_batch import ReserveBatcher
from store.resolve_batch import ResolveBatcher
from store.rows import WalletState
from store.schema import (
    account_status_changes,
    accounts,
    grants,
    reservation_slices,
    reservations,
    wallets,
)
from store.tx import Transactor
from store.wallet_copies import WalletCopies


def pending_guard() -> ColumnElement[bool]:
    """`status = 'pending'` for an update of one reservation found by its key, written so that
    the planner cannot use the hold sweeper's partial index (`WHERE status = 'pending'`) for
    it: with statistics that saw few pending reservations it estimated one row there and
    scanned them all (5.7 ms at 23,000) instead of the primary key (0.2 ms). status is never
    NULL. resolve_batch.py's write does the same."""
    return func.coalesce(reservations.c.status, "") == ReservationStatus.PENDING.value


def _grant_expiry_due(now_us: int) -> ColumnElement[bool]:
    """Grants past expires_at that the grant sweeper has yet to settle and can act on now:
    those with credits left to expire, and those spent out (remaining and held 0), to settle.
    A grant whose only credits are held waits for its reservations (DESIGN.md: held credits
    survive their grant's expiry). The first two terms repeat ix_grants_expiring's predicate,
    so the scan is that index's, in expiry order."""
    return and_(
        grants.c.expires_at_us.is_not(None),
        not_(grants.c.expiry_settled),
        grants.c.expires_at_us <= now_us,
        or_(grants.c.remaining > 0, grants.c.held == 0),
    )


@dataclass(frozen=True)
class LedgerSettings:
    hold_ttl_seconds_default: int = limits.HOLD_TTL_SECONDS_DEFAULT
    hold_ttl_seconds_max: int = limits.HOLD_TTL_SECONDS_MAX_DEFAULT
    idempotency_retention_seconds: int = limits.IDEMPOTENCY_RETENTION_SECONDS_DEFAULT
    # Postgres only: concurrent Reserve, Commit and Release calls share transactions
    # (store/batching.py).
    batch_writes: bool = True
    # How long a batch may wait for more calls while the server is saturated (0: never).
    batch_fill_wait_ms: int = limits.BATCH_FILL_WAIT_MS_DEFAULT
    # Wallets whose copies the batches keep for Reserve batches to skip a read (0: none;
    # wallet_copies.py).
    wallet_copies: int = limits.WALLET_COPIES_DEFAULT

    def __post_init__(self) -> None:
        if (
            not limits.HOLD_TTL_SECONDS_MIN
            <= self.hold_ttl_seconds_max
            <= limits.HOLD_TTL_SECONDS_CEILING
        ):
            raise ValueError(
                f"hold TTL max must be {limits.HOLD_TTL_SECONDS_MIN}.."
                f"{limits.HOLD_TTL_SECONDS_CEILING} s"
            )
        if (
            not limits.HOLD_TTL_SECONDS_MIN
            <= self.hold_ttl_seconds_default
            <= self.hold_ttl_seconds_max
        ):
            raise ValueError("hold TTL default must be between 1 s and the hold TTL max")
        if not 0 <= self.batch_fill_wait_ms <= limits.BATCH_FILL_WAIT_MS_MAX:
            raise ValueError(f"batch fill wait must be 0..{limits.BATCH_FILL_WAIT_MS_MAX} ms")
        if not 0 <= self.wallet_copies <= limits.WALLET_COPIES_MAX:
            raise ValueError(f"wallet copies must be 0..{limits.WALLET_COPIES_MAX}")
        if self.idempotency_retention_seconds < limits.IDEMPOTENCY_RETENTION_SECONDS_MIN:
            raise ValueError("idempotency keys must be kept at least 24 h (86400 s)")


# The wallet snapshot the current transaction attempt wrote (set by _journal, read after commit).
# A context variable: each RPC runs in its own task, so calls never see each other's.
_written_snapshot: ContextVar[tuple[str, str, WalletSnapshot] | None] = ContextVar(
    "written_snapshot", default=None
)
Resolution = Literal["commit", "release", "expire"]
T = TypeVar("T")
R = TypeVar("R", GrantResult, ReservationResult, ClawBackResult)
BatcherT = TypeVar("BatcherT", bound=Batcher[Any, Any])


def _finish(outcome: T | LedgerError) -> T:
    """Raises a failure that was decided (and possibly stored) inside a committed transaction."""
    if isinstance(outcome, LedgerError):
        raise outcome
    return outcome


class Ledger:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock | None = None,
        settings: LedgerSettings | None = None,
        cache: BalanceCache | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.clock: Clock = clock or SystemClock()
        self.settings = settings or LedgerSettings()
        self.transactor = Transactor(engine)
        batching = self.settings.batch_writes and engine.dialect.name == "postgresql"
        # `admission` (the server's rate limits) runs once per batch; the one-call path never
        # sees it, so callers without batching check their limits before calling the ledger.
        self.batch_connections = BatchConnections(engine) if batching else None
        self.reserve_batcher: ReserveBatcher | None = None
        # The copies of the wallets the batches wrote, for the Reserve batches to decide on;
        # every other write here drops the copies it makes stale (WalletCopies.published, from
        # _publish and _publish_local).
        self.wallet_copies = WalletCopies(self.settings.wallet_copies)
        self.resolve_batcher: ResolveBatcher | None = None
        if self.batch_connections is not None:
            publish = Publish(
                self._publish_local,
                self._publish_shared,
                shared_first=cache is not None and not cache.keeps_local_copy,
            )
            pool = self.batch_connections
            fill_wait_seconds = self.settings.batch_fill_wait_ms / 1000

            def batcher(kind: type[BatcherT]) -> BatcherT:
                return kind(
                    pool,
                    self.clock,
                    publish,
                    copies=self.wallet_copies,
                    admission=admission,
                    fill_wait_seconds=fill_wait_seconds,
                )

            self.reserve_batcher = batcher(ReserveBatcher)
            self.resolve_batcher = batcher(ResolveBatcher)

    async def close(self) -> None:
        """Lets the batches in flight finish (their callers are waiting), then closes their
        connections."""
        for batcher in (self.reserve_batcher, self.resolve_batcher):
            if batcher is not None:
                await batcher.close()
        if self.batch_connections is not None:
            await self.batch_connections.close()

    # ---- reads -------------------------------------------------------------------------------

    async def check(
        self, account_id: str, credit_type: str, amount: int = 0, *, consistent: bool = False
    ) -> Balance:
        """Balances for CheckCredits: from the cache when it holds a current snapshot (unless
        `consistent`), else from the database, refilling the cache. Never used to decide a
        reservation (DESIGN.md invariant 5)."""
        if not consistent:
            found = self.check_in_memory(account_id, credit_type, amount)
            if found is not None:
                return found
        validation.validate_check(account_id, credit_type, amount)
        if self.cache is not None and not consistent:
            wallet, account = await self.cache.get(account_id, credit_type)
            if wallet is not None and self.clock.now_us() < wallet.valid_until_us:
                self.cache.counters.hits += 1
                if account is None:
                    # Writes publish wallet copies only; the status is one primary-key read.
                    account = await self._read_account(account_id)
                    await self.cache.put_account(account_id, account)
                return balance_of(account_id, credit_type, wallet, account, from_cache=True)
            if wallet is None:
                self.cache.counters.misses += 1
            else:
                self.cache.counters.stale += 1
        wallet, account = await self._read_snapshots(account_id, credit_type)
        if self.cache is not None:
            await self.cache.put_wallet(account_id, credit_type, wallet)
            await self.cache.put_account(account_id, account)
        return balance_of(account_id, credit_type, wallet, account, from_cache=False)

    def check_in_memory(self, account_id: str, credit_type: str, amount: int) -> Balance | None:
        """check() answered from this process's copy without any I/O, or None (then check()
        it)."""
        found = self.snapshots_in_memory(account_id, credit_type, amount)
        if found is None:
            return None
        return balance_of(account_id, credit_type, *found, from_cache=True)

    def snapshots_in_memory(
        self, account_id: str, credit_type: str, amount: int
    ) -> tuple[WalletSnapshot, AccountSnapshot] | None:
        """What check_in_memory answers from (counted as a cache hit). The request is valid
        when this answers: the copy exists only for a wallet some valid call read or changed,
        and the amount is in range."""
        if self.cache is None or not 0 <= amount <= limits.AMOUNT_MAX:
            return None
        wallet, account = self.cache.get_local(account_id, credit_type, self.clock.now_us())
        if wallet is None or account is None:
            return None
        self.cache.counters.hits += 1
        return wallet, account

    async def _read_snapshots(
        self, account_id: str, credit_type: str
    ) -> tuple[WalletSnapshot, AccountSnapshot]:
        async def work(conn: AsyncConnection) -> tuple[WalletSnapshot, AccountSnapshot]:
            return await rows.read_snapshots(conn, account_id, credit_type, self.clock.now_us())

        return await self.transactor.read(work)

    async def _read_account(self, account_id: str) -> AccountSnapshot:
        async def work(conn: AsyncConnection) -> AccountSnapshot:
            return await rows.read_account_snapshot(conn, account_id)

        return await self.transactor.read(work)

    async def _once_per_key(
        self,
        account_id: str,
        idempotency_key: str,
        operation: str,
        request: idempotency.RequestFields,
        result_kind: type[R],
        apply: Callable[[AsyncConnection], Awaitable[R | BusinessFailure]],
    ) -> R:
        """Runs `apply` at most once per idempotency key, in one transaction with the key's
        claim: the first completed outcome (result or business failure) is stored under the key
        and every later request with the same key and the same fields gets it back. Anything
        `apply` raises rolls the claim back, so invalid requests and transient failures leave
        the key free."""

        async def work(conn: AsyncConnection) -> R | BusinessFailure:
            now_us = self.clock.now_us()
            stored = await idempotency.claim(
                conn, account_id, idempotency_key, operation, request, now_us
            )
            if stored is not None:
                return _expect(stored, result_kind)
            outcome = await apply(conn)
            await idempotency.record(conn, account_id, idempotency_key, outcome)
            return outcome

        outcome = await self._write(work)
        await self._publish()
        return _finish(outcome)

    async def _write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """A write transaction whose journal entries leave their wallet snapshot behind."""

        async def attempt(conn: AsyncConnection) -> T:
            _written_snapshot.set(None)  # a retried attempt must not publish a rolled-back one
            return await work(conn)

        return await self.transactor.write(attempt)

    async def _publish(self) -> None:
        """Puts the snapshot the just-committed transaction computed into the cache: no extra
        read. Best effort, like every cache write."""
        written = _written_snapshot.get()
        if written is None:
            return
        self.wallet_copies.published([written])
        if self.cache is None:
            return
        account_id, credit_type, snapshot = written
        await self.cache.put_wallet(account_id, credit_type, snapshot)

    def _publish_local(self, written: Sequence[Published]) -> None:
        self.wallet_copies.published(written)
        if self.cache is not None:
            self.cache.put_wallets_local(written)

    async def _publish_shared(self, written: Sequence[Published]) -> None:
        if self.cache is not None:
            await self.cache.put_wallets_shared(written)

    async def get_grant(self, account_id: str, grant_id: str) -> Grant | None:
        async def work(conn: AsyncConnection) -> Grant | None:
            row = (
                await conn.execute(
                    select(grants).where(
                        grants.c.account_id == account_id, grants.c.grant_id == grant_id
                    )
                )
            ).first()
            return None if row is None else rows.grant_from_row(row)

        return await self.transactor.read(work)

    async def get_reservation(self, account_id: str, reservation_id: str) -> Reservation | None:
        async def work(conn: AsyncConnection) -> Reservation | None:
            found = await rows.load_reservation(conn, account_id, reservation_id)
            return None if found is None else found[0]

        return await self.transactor.read(work)

    async def ping(self) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.scalar(select(1))

        await self.transactor.read(work)

    # ---- AddCredits --------------------------------------------------------------------------

    async def add_credits(self, cmd: AddCreditsCommand, caller: Caller) -> GrantResult:
        untimely = validation.validate_add_credits(cmd, self.clock.now_us(), caller)
        assert cmd.source is not None, "validation requires a source"
        request = {
            "credit_type": cmd.credit_type,
            "amount": cmd.amount,
            "source": cmd.source,
            "priority": cmd.priority,
            "effective_at_us": cmd.effective_at_us,
            "expires_at_us": cmd.expires_at_us,
            "external_ref": cmd.external_ref,
            "metadata": dict(cmd.metadata),
            "action": caller.action,
        }

        async def apply(conn: AsyncConnection) -> GrantResult | BusinessFailure:
            if untimely is not None:
                raise untimely  # a new key: the times must be valid now (rolls the claim back)
            return await self._add_credits(conn, cmd, caller)

        return await self._once_per_key(
            cmd.account_id, cmd.idempotency_key, "add_credits", request, GrantResult, apply
        )

    async def _add_credits(
        self, conn: AsyncConnection, cmd: AddCreditsCommand, caller: Caller
    ) -> GrantResult | BusinessFailure:
        now_us = self.clock.now_us()
        await conn.execute(
            rows.upsert(conn, accounts)
            .values(
                account_id=cmd.account_id,
                status=AccountStatus.ACTIVE.value,
                created_at_us=now_us,
                updated_at_us=now_us,
            )
            .on_conflict_do_nothing(index_elements=["account_id"])
        )
        await conn.execute(
            rows.upsert(conn, wallets)
            .values(
                account_id=cmd.account_id,
                credit_type=cmd.credit_type,
                last_sequence=0,
                reserved=0,
                created_at_us=now_us,
            )
            .on_conflict_do_nothing(index_elements=["account_id", "credit_type"])
        )
        wallet = await rows.lock_wallet(conn, cmd.account_id, cmd.credit_type)
        assert wallet is not None, "the wallet row was just upserted"
        now_us = self.clock.now_us()
        assert cmd.source is not None, "validated before the transaction"
        unexpired = await _unexpired_total(conn, cmd.account_id, cmd.credit_type)
        if unexpired + cmd.amount > limits.WALLET_BALANCE_MAX:
            return BalanceLimitExceeded(
                cmd.account_id, cmd.credit_type, unexpired, limits.WALLET_BALANCE_MAX
            )
        grant = Grant(
            grant_id=new_id("grt"),
            account_id=cmd.account_id,
            credit_type=cmd.credit_type,
            amount=cmd.amount,
            remaining=cmd.amount,
            held=0,
            consumed=0,
            expired=0,
            source=cmd.source,
            priority=limits.PRIORITY_DEFAULT if cmd.priority is None else cmd.priority,
            effective_at_us=now_us if cmd.effective_at_us is None else cmd.effective_at_us,
            expires_at_us=cmd.expires_at_us,
            external_ref=cmd.external_ref,
            metadata=dict(cmd.metadata),
            created_at_us=now_us,
        )
        await conn.execute(
            insert(grants).values(
                account_id=grant.account_id,
                grant_id=grant.grant_id,
                credit_type=grant.credit_type,
                amount=grant.amount,
                remaining=grant.remaining,
                held=0,
                consumed=0,
                expired=0,
                source=grant.source.value,
                priority=grant.priority,
                effective_at_us=grant.effective_at_us,
                expires_at_us=grant.expires_at_us,
                external_ref=grant.external_ref,
                metadata_json=codec.metadata_to_json(grant.metadata),
                idempotency_key=cmd.idempotency_key,
                created_at_us=now_us,
            )
        )
        entry = await self._journal(
            conn,
            wallet,
            cmd.account_id,
            cmd.credit_type,
            now_us,
            caller,
            kind=EntryKind.GRANT,
            effects=(GrantEffect(grant.grant_id, remaining_delta=grant.amount),),
            reserved_delta=0,
            grant_id=grant.grant_id,
            idempotency_key=cmd.idempotency_key,
        )
        return GrantResult(grant, entry)

    # ---- Reserve -----------------------------------------------------------------------------

    async def reserve(self, cmd: ReserveCommand, caller: Caller) -> ReservationResult:
        validation.validate_reserve(cmd, self.settings.hold_ttl_seconds_max, caller)
        # request_id is a tracing label, not part of the request: a retry may carry a new one.
        request = {
            "credit_type": cmd.credit_type,
            "amount": cmd.amount,
            "ttl_seconds": cmd.ttl_seconds,
            "metadata": dict(cmd.metadata),
            "action": caller.action,
        }

        if self.reserve_batcher is not None:
            ttl_seconds = cmd.ttl_seconds or self.settings.hold_ttl_seconds_default
            decided = await self.reserve_batcher.reserve(
                cmd, caller, idempotency.request_json("reserve", request), ttl_seconds
            )
            if decided is not None:
                return _finish(decided)
            # A replayed key, or a batch that failed: the one-call path settles it.

        async def apply(conn: AsyncConnection) -> ReservationResult | BusinessFailure:
            return await self._reserve(conn, cmd, caller)

        return await self._once_per_key(
            cmd.account_id, cmd.idempotency_key, "reserve", request, ReservationResult, apply
        )

    async def _reserve(
        self, conn: AsyncConnection, cmd: ReserveCommand, caller: Caller
    ) -> ReservationResult | BusinessFailure:
        wallet = await rows.lock_wallet(conn, cmd.account_id, cmd.credit_type)
        now_us = self.clock.now_us()
        account = await rows.read_account_snapshot(conn, cmd.account_id)
        if account.status is AccountStatus.LOCKED:
            return AccountLocked(cmd.account_id)
        lots, next_change_us = (
            ([], NO_SCHEDULED_CHANGE_US)
            if wallet is None
            else await rows.spendable_lots(conn, cmd.account_id, cmd.credit_type, now_us)
        )
        available = sum(lot.amount for lot in lots)
        slices = allocate(lots, cmd.amount) if available >= cmd.amount else None
        if wallet is None or slices is None:
            return InsufficientCredits(cmd.account_id, cmd.credit_type, cmd.amount, available)

        ttl_seconds = cmd.ttl_seconds or self.settings.hold_ttl_seconds_default
        reservation = Reservation.pending(new_id("rsv"), cmd, caller, now_us, ttl_seconds, slices)
        await _apply_grant_deltas(
            conn,
            cmd.account_id,
            [
                GrantEffect(s.grant_id, remaining_delta=-s.amount, held_delta=s.amount)
                for s in slices
            ],
        )
        sequence = wallet.last_sequence + 1
        await conn.execute(
            insert(reservations).values(
                account_id=reservation.account_id,
                reservation_id=reservation.reservation_id,
                credit_type=reservation.credit_type,
                amount=reservation.amount,
                status=reservation.status.value,
                created_at_us=now_us,
                expires_at_us=reservation.expires_at_us,
                resolved_at_us=None,
                amount_committed=0,
                amount_released=0,
                amount_expired=0,
                action=reservation.action,
                request_id=reservation.request_id,
                metadata_json=codec.metadata_to_json(reservation.metadata),
                idempotency_key=cmd.idempotency_key,
                reserve_sequence=sequence,
                resolution_sequence=None,
            )
        )
        await conn.execute(
            insert(reservation_slices),
            [
                {
                    "account_id": cmd.account_id,
                    "reservation_id": reservation.reservation_id,
                    "grant_id": s.grant_id,
                    "amount": s.amount,
                }
                for s in slices
            ],
        )
        entry = await self._journal(
            conn,
            wallet,
            cmd.account_id,
            cmd.credit_type,
            now_us,
            caller,
            kind=EntryKind.RESERVE,
            effects=tuple(
                GrantEffect(s.grant_id, remaining_delta=-s.amount, held_delta=s.amount)
                for s in slices
            ),
            reserved_delta=cmd.amount,
            reservation_id=reservation.reservation_id,
            idempotency_key=cmd.idempotency_key,
            available_after=available - cmd.amount,
            # Conservative: reserving can only make a lot's expiry irrelevant, never add one.
            next_change_us=next_change_us,
        )
        return ReservationResult(reservation, entry)

    # ---- Commit / Release / hold expiry ------------------------------------------------------

    async def commit(self, cmd: CommitCommand, caller: Caller) -> ReservationResult:
        validation.validate_commit(cmd, caller)
        return await self._resolve(cmd.account_id, cmd.reservation_id, "commit", cmd.amount, caller)

    async def release(self, cmd: ReleaseCommand, caller: Caller) -> ReservationResult:
        validation.validate_release(cmd, caller)
        return await self._resolve(cmd.account_id, cmd.reservation_id, "release", None, caller)

    async def _resolve(
        self,
        account_id: str,
        reservation_id: str,
        resolution: Resolution,
        amount: int | None,
        caller: Caller,
    ) -> ReservationResult:
        if self.resolve_batcher is not None and resolution != "expire":
            decided = await self.resolve_batcher.resolve(
                account_id, reservation_id, resolution, amount, caller
            )
            if decided is not None:
                return decided
            # Not the plain case (or a batch that failed): the one-call path answers.

        async def work(conn: AsyncConnection) -> ReservationResult | LedgerError:
            credit_type = await conn.scalar(
                select(reservations.c.credit_type).where(
                    reservations.c.account_id == account_id,
                    reservations.c.reservation_id == reservation_id,
                )
            )
            if credit_type is None:
                return ReservationNotFound(account_id, reservation_id)
            wallet = await rows.lock_wallet(conn, account_id, credit_type)
            assert wallet is not None, "a reservation's wallet exists"
            now_us = self.clock.now_us()
            # Read again under the wallet lock: the state may have moved while we waited.
            found = await rows.load_reservation(conn, account_id, reservation_id)
            assert found is not None
            reservation, resolution_sequence = found
            if amount is not None and amount > reservation.amount:
                return InvalidRequest(
                    [
                        FieldViolation(
                            "amount",
                            f"is {amount} but reservation {reservation_id!r} holds only "
                            f"{reservation.amount}; commit at most the reserved amount",
                        )
                    ]
                )
            if reservation.status is not ReservationStatus.PENDING:
                assert resolution_sequence is not None
                return await _repeat_or_conflict(
                    conn, reservation, resolution_sequence, resolution, amount
                )
            if now_us >= reservation.expires_at_us:
                # The clock decides once: past the TTL the hold is expired, sweeper or not. A
                # commit fails; a release gets the expired hold, as it would after a sweep.
                expired = await self._settle(
                    conn, wallet, reservation, "expire", 0, now_us, _system(caller)
                )
                return expired if resolution == "release" else _expired_conflict(reservation)
            consumed = (
                (reservation.amount if amount is None else amount) if resolution == "commit" else 0
            )
            return await self._settle(
                conn, wallet, reservation, resolution, consumed, now_us, caller
            )

        outcome = await self._write(work)
        await self._publish()
        return _finish(outcome)

    async def _settle(
        self,
        conn: AsyncConnection,
        wallet: WalletState,
        reservation: Reservation,
        resolution: Resolution,
        consumed_total: int,
        now_us: int,
        caller: Caller,
    ) -> ReservationResult:
        """Resolves a pending reservation: consumes `consumed_total` in burn-down order and
        hands the rest back to its grants (straight to `expired` for grants past expires_at)."""
        assert reservation.status is ReservationStatus.PENDING
        # Commit and Release carry no labels of their own: the journal keeps the reservation's
        # action (so History by action finds the charge) and the caller's request id.
        caller = replace(
            caller,
            action=caller.action or reservation.action,
            request_id=caller.request_id or reservation.request_id,
        )
        grant_rows = {
            r.grant_id: r
            for r in await conn.execute(
                select(
                    grants.c.grant_id,
                    grants.c.priority,
                    grants.c.effective_at_us,
                    grants.c.expires_at_us,
                ).where(
                    grants.c.account_id == reservation.account_id,
                    grants.c.grant_id.in_([s.grant_id for s in reservation.slices]),
                )
            )
        }
        slice_lots = [
            Lot(
                s.grant_id,
                grant_rows[s.grant_id].priority,
                grant_rows[s.grant_id].effective_at_us,
                grant_rows[s.grant_id].expires_at_us,
                s.amount,
            )
            for s in reservation.slices
        ]
        effects: list[GrantEffect] = []
        for outcome in consume(slice_lots, consumed_total):
            expires_at_us = grant_rows[outcome.grant_id].expires_at_us
            grant_expired = expires_at_us is not None and now_us >= expires_at_us
            effects.append(
                GrantEffect(
                    outcome.grant_id,
                    remaining_delta=0 if grant_expired else outcome.returned,
                    held_delta=-(outcome.consumed + outcome.returned),
                    consumed_delta=outcome.consumed,
                    expired_delta=outcome.returned if grant_expired else 0,
                )
            )
        await _apply_grant_deltas(conn, reservation.account_id, effects)

        status, kind = {
            "commit": (ReservationStatus.COMMITTED, EntryKind.COMMIT),
            "release": (ReservationStatus.RELEASED, EntryKind.RELEASE),
            "expire": (ReservationStatus.EXPIRED, EntryKind.HOLD_EXPIRY),
        }[resolution]
        returned = reservation.amount - consumed_total
        resolved = replace(
            reservation,
            status=status,
            resolved_at_us=now_us,
            amount_committed=consumed_total,
            amount_released=returned if resolution != "expire" else 0,
            amount_expired=reservation.amount if resolution == "expire" else 0,
        )
        assert (
            resolved.amount_committed + resolved.amount_released + resolved.amount_expired
            == resolved.amount
        )
        sequence = wallet.last_sequence + 1
        result = await conn.execute(
            update(reservations)
            .where(
                reservations.c.account_id == reservation.account_id,
                reservations.c.reservation_id == reservation.reservation_id,
                pending_guard(),
            )
            .values(
                status=status.value,
                resolved_at_us=now_us,
                amount_committed=resolved.amount_committed,
                amount_released=resolved.amount_released,
                amount_expired=resolved.amount_expired,
                resolution_sequence=sequence,
            )
        )
        assert result.rowcount == 1, "a reservation is resolved at most once"
        entry = await self._journal(
            conn,
            wallet,
            reservation.account_id,
            reservation.credit_type,
            now_us,
            caller,
            kind=kind,
            effects=tuple(effects),
            reserved_delta=-reservation.amount,
            reservation_id=reservation.reservation_id,
        )
        return ReservationResult(resolved, entry)

    # ---- sweepers ----------------------------------------------------------------------------

    async def sweep_expired_holds(self, batch_max: int = limits.SWEEP_BATCH_MAX) -> int:
        """Expires pending reservations past their TTL; returns how many it expired. Safe on any
        number of replicas at once: a wallet another transaction holds is skipped this round."""
        now_us = self.clock.now_us()

        async def find(conn: AsyncConnection) -> list[tuple[str, str, str]]:
            result = await conn.execute(
                select(
                    reservations.c.account_id,
                    reservations.c.reservation_id,
                    reservations.c.credit_type,
                )
                .where(
                    reservations.c.status == ReservationStatus.PENDING.value,
                    reservations.c.expires_at_us <= now_us,
                )
                .order_by(reservations.c.expires_at_us)
                .limit(batch_max)
            )
            return [(r.account_id, r.reservation_id, r.credit_type) for r in result]

        expired = 0
        for account_id, reservation_id, credit_type in await self.transactor.read(find):

            async def expire(
                conn: AsyncConnection,
                a: str = account_id,
                r: str = reservation_id,
                c: str = credit_type,
            ) -> bool:
                wallet = await rows.lock_wallet(conn, a, c, skip_locked=True)
                if wallet is None:
                    return False
                found = await rows.load_reservation(conn, a, r)
                assert found is not None
                reservation = found[0]
                at_us = self.clock.now_us()
                if (
                    reservation.status is not ReservationStatus.PENDING
                    or at_us < reservation.expires_at_us
                ):
                    return False
                await self._settle(conn, wallet, reservation, "expire", 0, at_us, _system(Caller()))
                return True

            if await self._write(expire):
                expired += 1
                await self._publish()
        return expired

    async def sweep_expired_grants(self, batch_max: int = limits.SWEEP_BATCH_MAX) -> int:
        """Expires the remaining part of grants past expires_at (held parts wait for their
        reservations), and settles those with nothing left (grants.expiry_settled); returns how
        many grants it expired."""
        now_us = self.clock.now_us()

        async def find(conn: AsyncConnection) -> list[tuple[str, str]]:
            result = await conn.execute(
                select(grants.c.account_id, grants.c.credit_type)
                .where(_grant_expiry_due(now_us))
                .order_by(grants.c.expires_at_us)
                .limit(batch_max)
            )
            return sorted({(r.account_id, r.credit_type) for r in result})

        expired = 0
        for account_id, credit_type in await self.transactor.read(find):

            async def expire(
                conn: AsyncConnection, a: str = account_id, c: str = credit_type
            ) -> int:
                wallet = await rows.lock_wallet(conn, a, c, skip_locked=True)
                if wallet is None:
                    return 0
                at_us = self.clock.now_us()
                due = (
                    await conn.execute(
                        select(grants.c.grant_id, grants.c.remaining)
                        .where(
                            grants.c.account_id == a,
                            grants.c.credit_type == c,
                            _grant_expiry_due(at_us),
                        )
                        .order_by(grants.c.expires_at_us, grants.c.grant_id)
                    )
                ).all()
                count = 0
                for grant_id, remaining in due:
                    if remaining == 0:
                        continue  # spent out before it expired: only settled, below
                    effect = GrantEffect(
                        grant_id, remaining_delta=-remaining, expired_delta=remaining
                    )
                    await _apply_grant_deltas(conn, a, [effect])
                    await self._journal(
                        conn,
                        wallet,
                        a,
                        c,
                        at_us,
                        _system(Caller()),
                        kind=EntryKind.GRANT_EXPIRY,
                        effects=(effect,),
                        reserved_delta=0,
                        grant_id=grant_id,
                    )
                    wallet = WalletState(wallet.last_sequence + 1, wallet.reserved)
                    count += 1
                # Nothing is left to expire of those that hold no credits either (remaining is
                # 0 now): settle them, so that no later pass reads them again.
                await conn.execute(
                    update(grants)
                    .where(
                        grants.c.account_id == a,
                        grants.c.grant_id.in_([grant_id for grant_id, _ in due]),
                        grants.c.remaining == 0,
                        grants.c.held == 0,
                    )
                    .values(expiry_settled=True)
                )
                return count

            count = await self._write(expire)
            if count:
                expired += count
                await self._publish()
        return expired

    async def prune_idempotency_keys(self, batch_max: int = limits.SWEEP_BATCH_MAX) -> int:
        older_than_us = (
            self.clock.now_us()
            - self.settings.idempotency_retention_seconds * limits.MICROSECONDS_PER_SECOND
        )

        async def work(conn: AsyncConnection) -> int:
            return await idempotency.prune(conn, older_than_us, batch_max)

        return await self.transactor.write(work)

    # ---- admin -------------------------------------------------------------------------------

    async def set_account_status(
        self,
        account_id: str,
        status: AccountStatus,
        reason: str = "",
        caller: Caller | None = None,
    ) -> AccountStatusChange:
        caller = caller or Caller()
        validation.validate_account_status(account_id, reason, caller)

        async def work(conn: AsyncConnection) -> tuple[AccountStatusChange, AccountSnapshot | None]:
            now_us = self.clock.now_us()
            await conn.execute(
                rows.upsert(conn, accounts)
                .values(
                    account_id=account_id,
                    status=AccountStatus.ACTIVE.value,
                    created_at_us=now_us,
                    updated_at_us=now_us,
                )
                .on_conflict_do_nothing(index_elements=["account_id"])
            )
            current = (
                await conn.execute(
                    select(accounts.c.status, accounts.c.status_version)
                    .where(accounts.c.account_id == account_id)
                    .with_for_update()
                )
            ).one()
            if current.status == status.value:
                return AccountStatusChange(account_id, status, changed=False), None
            # Never 0 after a change: version 0 is what a cache holds for an account with no row.
            version = max(current.status_version, 0) + 1
            await conn.execute(
                update(accounts)
                .where(accounts.c.account_id == account_id)
                .values(status=status.value, status_version=version, updated_at_us=now_us)
            )
            await conn.execute(
                insert(account_status_changes).values(
                    account_id=account_id,
                    status_version=version,
                    status=status.value,
                    reason=reason,
                    principal=caller.principal,
                    request_id=caller.request_id,
                    created_at_us=now_us,
                )
            )
            changed = AccountStatusChange(account_id, status, changed=True)
            return changed, AccountSnapshot(version=version, status=status)

        change, snapshot = await self.transactor.write(work)
        if snapshot is not None and self.cache is not None:
            # The new status and its version are known from the transaction: no read needed.
            await self.cache.put_account(account_id, snapshot)
        return change

    # ---- ClawBack ----------------------------------------------------------------------------

    async def claw_back(self, cmd: ClawBackCommand, caller: Caller) -> ClawBackResult:
        validation.validate_claw_back(cmd, caller)
        request = {"grant_id": cmd.grant_id, "amount": cmd.amount, "action": caller.action}

        async def apply(conn: AsyncConnection) -> ClawBackResult:
            credit_type = await conn.scalar(
                select(grants.c.credit_type).where(
                    grants.c.account_id == cmd.account_id, grants.c.grant_id == cmd.grant_id
                )
            )
            if credit_type is None:
                # Raised, not returned: the transaction rolls back and the key stays free.
                raise GrantNotFound(cmd.account_id, cmd.grant_id)
            wallet = await rows.lock_wallet(conn, cmd.account_id, credit_type)
            assert wallet is not None, "a grant's wallet exists"
            now_us = self.clock.now_us()
            remaining = await conn.scalar(
                select(grants.c.remaining).where(
                    grants.c.account_id == cmd.account_id, grants.c.grant_id == cmd.grant_id
                )
            )
            taken = min(cmd.amount, int(remaining or 0))
            entry = None
            if taken > 0:
                effect = GrantEffect(cmd.grant_id, remaining_delta=-taken, clawed_back_delta=taken)
                await _apply_grant_deltas(conn, cmd.account_id, [effect])
                entry = await self._journal(
                    conn,
                    wallet,
                    cmd.account_id,
                    credit_type,
                    now_us,
                    caller,
                    kind=EntryKind.CLAWBACK,
                    effects=(effect,),
                    reserved_delta=0,
                    grant_id=cmd.grant_id,
                    idempotency_key=cmd.idempotency_key,
                )
            row = (
                await conn.execute(
                    select(grants).where(
                        grants.c.account_id == cmd.account_id, grants.c.grant_id == cmd.grant_id
                    )
                )
            ).one()
            return ClawBackResult(rows.grant_from_row(row), cmd.amount, taken, entry)

        return await self._once_per_key(
            cmd.account_id, cmd.idempotency_key, "claw_back", request, ClawBackResult, apply
        )

    # ---- journal -----------------------------------------------------------------------------

    async def _journal(
        self,
        conn: AsyncConnection,
        wallet: WalletState,
        account_id: str,
        credit_type: str,
        now_us: int,
        caller: Caller,
        *,
        kind: EntryKind,
        effects: tuple[GrantEffect, ...],
        reserved_delta: int,
        grant_id: str = "",
        reservation_id: str = "",
        idempotency_key: str = "",
        available_after: int | None = None,
        next_change_us: int = NO_SCHEDULED_CHANGE_US,
    ) -> JournalEntry:
        """Appends the entry for a change already applied to the grants, and advances the
        wallet's sequence and reserved total in the same transaction."""
        after = WalletState(wallet.last_sequence + 1, wallet.reserved + reserved_delta)
        assert reserved_delta == sum(e.held_delta for e in effects), "reserved tracks held"
        if available_after is None:
            available_after, next_change_us = await rows.available_and_next_change(
                conn, account_id, credit_type, now_us
            )
        entry = JournalEntry(
            account_id=account_id,
            credit_type=credit_type,
            sequence=after.last_sequence,
            kind=kind,
            amount=sum(e.unexpired_delta for e in effects),
            available_after=available_after,
            reserved_after=after.reserved,
            grant_id=grant_id,
            reservation_id=reservation_id,
            idempotency_key=idempotency_key,
            principal=caller.principal,
            action=caller.action,
            request_id=caller.request_id,
            created_at_us=now_us,
            grant_effects=effects,
        )
        await rows.append_entry(conn, entry)
        await rows.save_wallet(conn, account_id, credit_type, after)
        _written_snapshot.set(
            (
                account_id,
                credit_type,
                WalletSnapshot(
                    version=entry.sequence,
                    available=entry.available_after,
                    reserved=entry.reserved_after,
                    valid_until_us=next_change_us,
                    as_of_us=now_us,
                ),
            )
        )
        return entry


def balance_of(
    account_id: str,
    credit_type: str,
    wallet: WalletSnapshot,
    account: AccountSnapshot,
    *,
    from_cache: bool,
) -> Balance:
    return Balance(
        account_id=account_id,
        credit_type=credit_type,
        available=wallet.available,
        reserved=wallet.reserved,
        account_status=account.status,
        as_of_us=wallet.as_of_us,
        from_cache=from_cache,
    )


def _system(caller: Caller) -> Caller:
    """Changes the server makes on its own (expiry) are journaled as the system principal."""
    return Caller(principal=SYSTEM_PRINCIPAL, action=caller.action, request_id=caller.request_id)


def _expect(outcome: codec.Outcome, kind: type[T]) -> T | BusinessFailure:
    if isinstance(outcome, BusinessFailure):
        return outcome
    assert isinstance(outcome, kind), f"stored outcome {type(outcome).__name__} is not a {kind}"
    return outcome


async def _unexpired_total(conn: AsyncConnection, account_id: str, credit_type: str) -> int:
    total = await conn.scalar(
        select(func.coalesce(func.sum(grants.c.remaining + grants.c.held), 0)).where(
            grants.c.account_id == account_id, grants.c.credit_type == credit_type
        )
    )
    return int(total or 0)


async def _apply_grant_deltas(
    conn: AsyncConnection, account_id: str, effects: list[GrantEffect]
) -> None:
    """One UPDATE per grant; the CHECK constraints refuse any negative part."""
    if not effects:
        return
    await conn.execute(
        update(grants)
        .where(
            grants.c.account_id == bindparam("p_account"), grants.c.grant_id == bindparam("p_grant")
        )
        .values(
            remaining=grants.c.remaining + bindparam("p_remaining"),
            held=grants.c.held + bindparam("p_held"),
            consumed=grants.c.consumed + bindparam("p_consumed"),
            expired=grants.c.expired + bindparam("p_expired"),
            clawed_back=grants.c.clawed_back + bindparam("p_clawed_back"),
        ),
        [
            {
                "p_account": account_id,
                "p_grant": e.grant_id,
                "p_remaining": e.remaining_delta,
                "p_held": e.held_delta,
                "p_consumed": e.consumed_delta,
                "p_expired": e.expired_delta,
                "p_clawed_back": e.clawed_back_delta,
            }
            for e in effects
        ],
    )


def _expired_conflict(reservation: Reservation) -> ReservationStateConflict:
    return ReservationStateConflict(
        "RESERVATION_EXPIRED",
        f"reservation {reservation.reservation_id!r} expired at its TTL "
        f"(expires_at_us={reservation.expires_at_us}) and its credits were returned; "
        "reserve again",
        {"status": "expired", "amount": str(reservation.amount)},
    )


async def _repeat_or_conflict(
    conn: AsyncConnection,
    reservation: Reservation,
    resolution_sequence: int,
    resolution: Resolution,
    amount: int | None,
) -> ReservationResult | LedgerError:
    """A request on a resolved reservation: the same answer again, or a conflict naming it."""
    status = reservation.status
    same = (
        resolution == "commit"
        and status is ReservationStatus.COMMITTED
        and (reservation.amount if amount is None else amount) == reservation.amount_committed
    ) or (
        resolution == "release"
        and status in (ReservationStatus.RELEASED, ReservationStatus.EXPIRED)
    )
    if same:
        entry = await rows.load_entry(
            conn, reservation.account_id, reservation.credit_type, resolution_sequence
        )
        return ReservationResult(reservation, entry)
    if status is ReservationStatus.EXPIRED:
        return _expired_conflict(reservation)
    rid = reservation.reservation_id
    metadata = {
        "status": status.value,
        "amount": str(reservation.amount),
        "amount_committed": str(reservation.amount_committed),
        "amount_released": str(reservation.amount_released),
    }
    if status is ReservationStatus.COMMITTED:
        asked = (
            "release it"
            if resolution == "release"
            else (f"commit {reservation.amount if amount is None else amount}")
        )
        return ReservationStateConflict(
            "RESERVATION_COMMITTED",
            f"reservation {rid!r} was already committed for {reservation.amount_committed}; "
            f"cannot {asked}. Reserve again for new work",
            metadata,
        )
    return ReservationStateConflict(
        "RESERVATION_RELEASED",
        f"reservation {rid!r} was already released; cannot commit it. Reserve again",
        metadata,
    )
