"""Values that cross the ledger's boundary. Frozen: nothing downstream may edit a ledger fact."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from store.limits import MICROSECONDS_PER_SECOND


class GrantSource(enum.StrEnum):
    PURCHASE = "purchase"
    SUBSCRIPTION = "subscription"
    PROMOTION = "promotion"
    SIGNUP = "signup"
    REFERRAL = "referral"
    REFUND = "refund"
    ADMIN = "admin"
    TRANSFER = "transfer"


class AccountStatus(enum.StrEnum):
    ACTIVE = "active"
    LOCKED = "locked"


class ReservationStatus(enum.StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class EntryKind(enum.StrEnum):
    GRANT = "grant"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    HOLD_EXPIRY = "hold_expiry"
    GRANT_EXPIRY = "grant_expiry"
    CLAWBACK = "clawback"


SYSTEM_PRINCIPAL = "system"
ANONYMOUS_PRINCIPAL = "anonymous"


@dataclass(frozen=True)
class Caller:
    """Who is asking, and the caller's labels for the journal."""

    principal: str = ANONYMOUS_PRINCIPAL
    action: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class AddCreditsCommand:
    account_id: str
    credit_type: str
    amount: int
    idempotency_key: str
    # None: the caller named no valid source; validation reports it with every other problem.
    source: GrantSource | None
    priority: int | None = None
    effective_at_us: int | None = None
    expires_at_us: int | None = None
    external_ref: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReserveCommand:
    account_id: str
    credit_type: str
    amount: int
    idempotency_key: str
    ttl_seconds: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitCommand:
    account_id: str
    reservation_id: str
    amount: int | None = None


@dataclass(frozen=True)
class ReleaseCommand:
    account_id: str
    reservation_id: str


@dataclass(frozen=True)
class ClawBackCommand:
    account_id: str
    grant_id: str
    amount: int
    idempotency_key: str


@dataclass(frozen=True)
class HistoryQuery:
    account_id: str
    credit_type: str = ""
    kinds: tuple[EntryKind, ...] = ()
    start_us: int | None = None
    end_us: int | None = None
    reservation_id: str = ""
    action: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class Grant:
    grant_id: str
    account_id: str
    credit_type: str
    amount: int
    remaining: int
    held: int
    consumed: int
    expired: int
    source: GrantSource
    priority: int
    effective_at_us: int
    expires_at_us: int | None
    external_ref: str
    metadata: Mapping[str, str]
    created_at_us: int
    clawed_back: int = 0


@dataclass(frozen=True)
class Slice:
    grant_id: str
    amount: int


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    account_id: str
    credit_type: str
    amount: int
    status: ReservationStatus
    created_at_us: int
    expires_at_us: int
    resolved_at_us: int | None
    amount_committed: int
    amount_released: int
    amount_expired: int
    action: str
    request_id: str
    metadata: Mapping[str, str]
    slices: tuple[Slice, ...]

    @classmethod
    def pending(
        cls,
        reservation_id: str,
        cmd: ReserveCommand,
        caller: Caller,
        now_us: int,
        ttl_seconds: int,
        slices: Sequence[Slice],
    ) -> Reservation:
        """A new hold of `slices`, as Reserve makes it (batched or one call at a time)."""
        return cls(
            reservation_id=reservation_id,
            account_id=cmd.account_id,
            credit_type=cmd.credit_type,
            amount=cmd.amount,
            status=ReservationStatus.PENDING,
            created_at_us=now_us,
            expires_at_us=now_us + ttl_seconds * MICROSECONDS_PER_SECOND,
            resolved_at_us=None,
            amount_committed=0,
            amount_released=0,
            amount_expired=0,
            action=caller.action,
            request_id=caller.request_id,
            metadata=dict(cmd.metadata),
            slices=tuple(slices),
        )


@dataclass(frozen=True)
class GrantEffect:
    grant_id: str
    remaining_delta: int = 0
    held_delta: int = 0
    consumed_delta: int = 0
    expired_delta: int = 0
    clawed_back_delta: int = 0

    @property
    def unexpired_delta(self) -> int:
        """Change to remaining + held: what the effect does to the wallet's unexpired credits."""
        return self.remaining_delta + self.held_delta


@dataclass(frozen=True)
class JournalEntry:
    account_id: str
    credit_type: str
    sequence: int
    kind: EntryKind
    amount: int
    available_after: int
    reserved_after: int
    grant_id: str
    reservation_id: str
    idempotency_key: str
    principal: str
    action: str
    request_id: str
    created_at_us: int
    grant_effects: tuple[GrantEffect, ...]

    @property
    def balance_after(self) -> int:
        return self.available_after + self.reserved_after


@dataclass(frozen=True)
class Balance:
    account_id: str
    credit_type: str
    available: int
    reserved: int
    account_status: AccountStatus
    as_of_us: int
    # Served from a cached snapshot (read from the database at as_of_us) rather than just now.
    from_cache: bool = False

    @property
    def balance(self) -> int:
        return self.available + self.reserved


@dataclass(frozen=True)
class GrantResult:
    grant: Grant
    entry: JournalEntry


@dataclass(frozen=True)
class ReservationResult:
    reservation: Reservation
    entry: JournalEntry


@dataclass(frozen=True)
class ClawBackResult:
    grant: Grant
    amount_requested: int
    amount_clawed_back: int
    # None when nothing could be taken back (nothing was journaled).
    entry: JournalEntry | None

    @property
    def shortfall(self) -> int:
        return self.amount_requested - self.amount_clawed_back


@dataclass(frozen=True)
class AccountStatusChange:
    account_id: str
    status: AccountStatus
    changed: bool


@dataclass(frozen=True)
class HistoryPage:
    entries: tuple[JournalEntry, ...]
    next_page_token: str
