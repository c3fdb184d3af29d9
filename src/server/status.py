"""Ledger errors -> rich gRPC statuses (google.rpc.Status with details), per DESIGN.md's table."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from store import limits
from store.errors import (
    BusinessFailure,
    GrantNotFound,
    IdempotencyKeyReused,
    InvalidRequest,
    LedgerError,
    ReservationNotFound,
    ReservationStateConflict,
    StoreUnavailable,
)

ERROR_DOMAIN = "credits.v1"
# How long a client should wait before retrying after UNAVAILABLE.
UNAVAILABLE_RETRY_DELAY_SECONDS = 1


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _error_info(reason: str, metadata: dict[str, str]) -> any_pb2.Any:
    return _packed(
        error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    )


def _clipped(text: str, bytes_max: int) -> str:
    """`text` cut to at most bytes_max bytes of UTF-8, on a character boundary."""
    encoded = text.encode()
    if len(encoded) <= bytes_max:
        return text
    return encoded[: bytes_max - 3].decode(errors="ignore") + "..."


def rich_status(code: int, message: str, details: list[any_pb2.Any]) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=code,
            message=_clipped(message, limits.STATUS_MESSAGE_BYTES_MAX),
            details=details,
        )
    )
    return status


def bad_request(violations: list[tuple[str, str]], message: str) -> grpc.Status:
    """INVALID_ARGUMENT naming each bad field, within a bounded size: clients drop trailers over
    8 KiB and would see RESOURCE_EXHAUSTED ("retry later") instead of the real answer."""
    shown: list[error_details_pb2.BadRequest.FieldViolation] = []
    budget = limits.STATUS_VIOLATIONS_BYTES_MAX
    for field, description in violations:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_clipped(field, limits.STATUS_FIELD_BYTES_MAX),
            description=_clipped(description, limits.STATUS_DESCRIPTION_BYTES_MAX),
        )
        budget -= violation.ByteSize()
        if budget < 0 or len(shown) == limits.STATUS_VIOLATIONS_MAX:
            break
        shown.append(violation)
    if len(shown) < len(violations):
        shown.append(
            error_details_pb2.BadRequest.FieldViolation(
                field="request",
                description=f"{len(violations) - len(shown)} more violations not shown; "
                "fix these and retry",
            )
        )
    detail = error_details_pb2.BadRequest(field_violations=shown)
    return rich_status(code_pb2.INVALID_ARGUMENT, message, [_packed(detail)])


def unauthenticated(reason: str, message: str) -> grpc.Status:
    """No usable credential: missing, malformed, unknown, revoked, or its caller disabled."""
    return rich_status(code_pb2.UNAUTHENTICATED, message, [_error_info(reason, {})])


def permission_denied(reason: str, message: str, metadata: dict[str, str]) -> grpc.Status:
    """A known caller asking for something its scopes or account prefixes do not allow."""
    return rich_status(code_pb2.PERMISSION_DENIED, message, [_error_info(reason, metadata)])


def from_ledger_error(error: LedgerError) -> grpc.Status:
    if isinstance(error, InvalidRequest):
        return bad_request(
            [(v.field, v.description) for v in error.violations], f"invalid request: {error}"
        )
    if isinstance(error, BusinessFailure):
        return rich_status(
            code_pb2.FAILED_PRECONDITION, str(error), [_error_info(error.reason, error.details())]
        )
    if isinstance(error, ReservationStateConflict):
        return rich_status(
            code_pb2.FAILED_PRECONDITION, str(error), [_error_info(error.reason, error.metadata)]
        )
    if isinstance(error, IdempotencyKeyReused):
        return rich_status(
            code_pb2.ALREADY_EXISTS,
            str(error),
            [_error_info("IDEMPOTENCY_KEY_REUSED", {"field": error.field})],
        )
    if isinstance(error, (ReservationNotFound, GrantNotFound)):
        return rich_status(code_pb2.NOT_FOUND, str(error), [])
    if isinstance(error, StoreUnavailable):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromSeconds(UNAVAILABLE_RETRY_DELAY_SECONDS)
        return rich_status(
            code_pb2.UNAVAILABLE,
            "the ledger database is unreachable; nothing was changed. Retry with the same "
            "idempotency key",
            [_packed(retry)],
        )
    raise AssertionError(f"no status mapping for {type(error).__name__}")
