"""protobuf <-> ledger values. Pure translation: every rule lives in the store."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credits_pb2 as pb
from store import limits, validation
from store.errors import FieldViolation, InvalidRequest
from store.model import (
    AccountStatus,
    AddCreditsCommand,
    Balance,
    ClawBackCommand,
    ClawBackResult,
    CommitCommand,
    EntryKind,
    Grant,
    GrantSource,
    HistoryPage,
    HistoryQuery,
    JournalEntry,
    ReleaseCommand,
    Reservation,
    ReservationStatus,
    ReserveCommand,
)

SOURCE_FROM_PB = {
    pb.GRANT_SOURCE_PURCHASE: GrantSource.PURCHASE,
    pb.GRANT_SOURCE_SUBSCRIPTION: GrantSource.SUBSCRIPTION,
    pb.GRANT_SOURCE_PROMOTION: GrantSource.PROMOTION,
    pb.GRANT_SOURCE_SIGNUP: GrantSource.SIGNUP,
    pb.GRANT_SOURCE_REFERRAL: GrantSource.REFERRAL,
    pb.GRANT_SOURCE_REFUND: GrantSource.REFUND,
    pb.GRANT_SOURCE_ADMIN: GrantSource.ADMIN,
    pb.GRANT_SOURCE_TRANSFER: GrantSource.TRANSFER,
}
SOURCE_TO_PB = {v: k for k, v in SOURCE_FROM_PB.items()}
KIND_FROM_PB = {
    pb.ENTRY_KIND_GRANT: EntryKind.GRANT,
    pb.ENTRY_KIND_RESERVE: EntryKind.RESERVE,
    pb.ENTRY_KIND_COMMIT: EntryKind.COMMIT,
    pb.ENTRY_KIND_RELEASE: EntryKind.RELEASE,
    pb.ENTRY_KIND_HOLD_EXPIRY: EntryKind.HOLD_EXPIRY,
    pb.ENTRY_KIND_GRANT_EXPIRY: EntryKind.GRANT_EXPIRY,
    pb.ENTRY_KIND_CLAWBACK: EntryKind.CLAWBACK,
}
KIND_TO_PB = {v: k for k, v in KIND_FROM_PB.items()}
STATUS_TO_PB = {
    ReservationStatus.PENDING: pb.RESERVATION_STATUS_PENDING,
    ReservationStatus.COMMITTED: pb.RESERVATION_STATUS_COMMITTED,
    ReservationStatus.RELEASED: pb.RESERVATION_STATUS_RELEASED,
    ReservationStatus.EXPIRED: pb.RESERVATION_STATUS_EXPIRED,
}
ACCOUNT_STATUS_TO_PB = {
    AccountStatus.ACTIVE: pb.ACCOUNT_STATUS_ACTIVE,
    AccountStatus.LOCKED: pb.ACCOUNT_STATUS_LOCKED,
}
ACCOUNT_STATUS_FROM_PB = {v: k for k, v in ACCOUNT_STATUS_TO_PB.items()}


def credit_type(value: str) -> str:
    return value or limits.CREDIT_TYPE_DEFAULT


def timestamp(us: int) -> Timestamp:
    # What Timestamp.FromMicroseconds computes, without its Python-level method call (this is on
    # every CheckCredits). Floor division keeps nanos in [0, 1e9) for times before 1970 too.
    seconds, micros = divmod(us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def optional_us(message: Any, field: str) -> int | None:
    """Microseconds of a Timestamp field, or None when unset. Range checks are the store's."""
    if not message.HasField(field):
        return None
    ts: Timestamp = getattr(message, field)
    if not 0 <= ts.nanos < 1_000_000_000:
        # Malformed on the wire: hand the store a time outside every range, which it rejects
        # together with the request's other problems.
        return validation.TIME_US_MAX + 1
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def add_credits_command(request: pb.AddCreditsRequest) -> AddCreditsCommand:
    return AddCreditsCommand(
        account_id=request.account_id,
        credit_type=credit_type(request.credit_type),
        amount=request.amount,
        idempotency_key=request.idempotency_key,
        source=SOURCE_FROM_PB.get(request.source),
        priority=request.priority if request.HasField("priority") else None,
        effective_at_us=optional_us(request, "effective_at"),
        expires_at_us=optional_us(request, "expires_at"),
        external_ref=request.external_ref,
        metadata=dict(request.metadata),
    )


def reserve_command(request: pb.ReserveRequest) -> ReserveCommand:
    return ReserveCommand(
        account_id=request.account_id,
        credit_type=credit_type(request.credit_type),
        amount=request.amount,
        idempotency_key=request.idempotency_key,
        ttl_seconds=request.ttl_seconds,
        metadata=dict(request.metadata),
    )


def commit_command(request: pb.CommitRequest) -> CommitCommand:
    return CommitCommand(
        account_id=request.account_id,
        reservation_id=request.reservation_id,
        amount=request.amount if request.HasField("amount") else None,
    )


def release_command(request: pb.ReleaseRequest) -> ReleaseCommand:
    return ReleaseCommand(account_id=request.account_id, reservation_id=request.reservation_id)


def history_query(request: pb.HistoryRequest) -> HistoryQuery:
    unknown = [k for k in request.kinds if k not in KIND_FROM_PB]
    query = HistoryQuery(
        account_id=request.account_id,
        credit_type=request.credit_type,
        kinds=tuple(KIND_FROM_PB[k] for k in request.kinds if k in KIND_FROM_PB),
        start_us=optional_us(request, "start_time"),
        end_us=optional_us(request, "end_time"),
        reservation_id=request.reservation_id,
        action=request.action,
        page_size=request.page_size,
        page_token=request.page_token,
    )
    if unknown:
        # Report the unknown kinds together with whatever else the store finds wrong.
        violations = [FieldViolation("kinds", f"{k} is not a known EntryKind") for k in unknown]
        try:
            validation.validate_history(query)
        except InvalidRequest as error:
            violations += error.violations
        raise InvalidRequest(violations)
    return query


def check_response(balance: Balance, amount: int) -> pb.CheckCreditsResponse:
    return pb.CheckCreditsResponse(
        allowed=balance.available >= amount and balance.account_status is AccountStatus.ACTIVE,
        available=balance.available,
        reserved=balance.reserved,
        balance=balance.balance,
        shortfall=max(0, amount - balance.available),
        account_status=ACCOUNT_STATUS_TO_PB[balance.account_status],
        as_of=timestamp(balance.as_of_us),
        cached=balance.from_cache,
    )


def grant_message(grant: Grant) -> pb.Grant:
    message = pb.Grant(
        grant_id=grant.grant_id,
        account_id=grant.account_id,
        credit_type=grant.credit_type,
        amount=grant.amount,
        remaining=grant.remaining,
        held=grant.held,
        consumed=grant.consumed,
        expired=grant.expired,
        source=SOURCE_TO_PB[grant.source],
        priority=grant.priority,
        effective_at=timestamp(grant.effective_at_us),
        external_ref=grant.external_ref,
        metadata=dict(grant.metadata),
        created_at=timestamp(grant.created_at_us),
        clawed_back=grant.clawed_back,
    )
    if grant.expires_at_us is not None:
        message.expires_at.CopyFrom(timestamp(grant.expires_at_us))
    return message


def reservation_message(reservation: Reservation) -> pb.Reservation:
    message = pb.Reservation(
        reservation_id=reservation.reservation_id,
        account_id=reservation.account_id,
        credit_type=reservation.credit_type,
        amount=reservation.amount,
        status=STATUS_TO_PB[reservation.status],
        created_at=timestamp(reservation.created_at_us),
        expires_at=timestamp(reservation.expires_at_us),
        amount_committed=reservation.amount_committed,
        amount_released=reservation.amount_released,
        amount_expired=reservation.amount_expired,
        action=reservation.action,
        request_id=reservation.request_id,
        metadata=dict(reservation.metadata),
        slices=[
            pb.ReservationSlice(grant_id=s.grant_id, amount=s.amount) for s in reservation.slices
        ],
    )
    if reservation.resolved_at_us is not None:
        message.resolved_at.CopyFrom(timestamp(reservation.resolved_at_us))
    return message


def entry_message(entry: JournalEntry) -> pb.JournalEntry:
    return pb.JournalEntry(
        account_id=entry.account_id,
        credit_type=entry.credit_type,
        sequence=entry.sequence,
        kind=KIND_TO_PB[entry.kind],
        amount=entry.amount,
        available_after=entry.available_after,
        reserved_after=entry.reserved_after,
        balance_after=entry.balance_after,
        grant_id=entry.grant_id,
        reservation_id=entry.reservation_id,
        idempotency_key=entry.idempotency_key,
        principal=entry.principal,
        action=entry.action,
        request_id=entry.request_id,
        created_at=timestamp(entry.created_at_us),
        grant_effects=[
            pb.GrantEffect(
                grant_id=e.grant_id,
                remaining_delta=e.remaining_delta,
                held_delta=e.held_delta,
                consumed_delta=e.consumed_delta,
                expired_delta=e.expired_delta,
                clawed_back_delta=e.clawed_back_delta,
            )
            for e in entry.grant_effects
        ],
    )


def history_response(page: HistoryPage) -> pb.HistoryResponse:
    return pb.HistoryResponse(
        entries=[entry_message(e) for e in page.entries], next_page_token=page.next_page_token
    )


def account_status(request: pb.SetAccountStatusRequest) -> AccountStatus:
    status = ACCOUNT_STATUS_FROM_PB.get(request.status)
    if status is None:
        raise InvalidRequest(
            [FieldViolation("status", "must be ACCOUNT_STATUS_ACTIVE or ACCOUNT_STATUS_LOCKED")]
        )
    return status


def claw_back_command(request: pb.ClawBackRequest) -> ClawBackCommand:
    return ClawBackCommand(
        account_id=request.account_id,
        grant_id=request.grant_id,
        amount=request.amount,
        idempotency_key=request.idempotency_key,
    )


def claw_back_response(result: ClawBackResult) -> pb.ClawBackResponse:
    response = pb.ClawBackResponse(
        grant=grant_message(result.grant),
        amount_clawed_back=result.amount_clawed_back,
        shortfall=result.shortfall,
    )
    if result.entry is not None:
        response.entry.CopyFrom(entry_message(result.entry))
    return response
