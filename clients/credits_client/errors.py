"""Typed exceptions parsed from the service's rich gRPC statuses.

The server encodes every failure as a `google.rpc.Status` in the `grpc-status-details-bin`
trailer, with `ErrorInfo` (domain "credits.v1"), `BadRequest` or `RetryInfo` details, and echoes
the call's request id in the `x-request-id` trailer. `error_from_rpc` turns that into one of the
classes below, so callers can write `except InsufficientCredits as error: error.shortfall`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "credits.v1"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"
REQUEST_ID_HEADER = "x-request-id"
AUTHORIZATION_HEADER = "authorization"

# Codes after which the same request (with the same idempotency key) may be sent again.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
RESERVATION_STATE_REASONS = frozenset(
    {"RESERVATION_EXPIRED", "RESERVATION_COMMITTED", "RESERVATION_RELEASED"}
)


@dataclass(frozen=True)
class _Parsed:
    """What the rich status said, independent of which exception it becomes."""

    code: grpc.StatusCode
    message: str
    request_id: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: tuple[tuple[str, str], ...] = ()
    retry_delay_seconds: float | None = None


class CreditsError(Exception):
    """Any failed call. Subclasses carry the parsed details of the cases callers handle.

    `reason` and `metadata` are the ErrorInfo's (empty when the status had none);
    `retry_delay_seconds` is the server's RetryInfo hint, None when it gave none.
    """

    def __init__(self, parsed: _Parsed) -> None:
        self.code = parsed.code
        self.message = parsed.message
        self.request_id = parsed.request_id
        self.reason = parsed.reason
        self.metadata: Mapping[str, str] = parsed.metadata
        self.retry_delay_seconds = parsed.retry_delay_seconds
        suffix = f" (request id {parsed.request_id})" if parsed.request_id else ""
        super().__init__(f"{parsed.code.name}: {parsed.message}{suffix}")

    @property
    def retryable(self) -> bool:
        """True when nothing was changed and the same request may be sent again."""
        return self.code in RETRYABLE_CODES


class InsufficientCredits(CreditsError):
    """The wallet's available credits are fewer than the amount asked for. Nothing was held."""

    def __init__(self, parsed: _Parsed) -> None:
        super().__init__(parsed)
        self.required = _metadata_int(parsed.metadata, "required")
        self.available = _metadata_int(parsed.metadata, "available")
        shortfall = parsed.metadata.get("shortfall")
        self.shortfall = (
            _metadata_int(parsed.metadata, "shortfall")
            if shortfall is not None
            else max(0, self.required - self.available)
        )


class AccountLocked(CreditsError):
    """The account is locked and cannot reserve; reads and grants still work."""


class ReservationStateError(CreditsError):
    """The reservation is already expired, committed or released.

    `reason` is RESERVATION_EXPIRED, RESERVATION_COMMITTED or RESERVATION_RELEASED; `status` is
    the reservation's state as the server names it ("expired", "committed", "released").
    """

    def __init__(self, parsed: _Parsed) -> None:
        super().__init__(parsed)
        self.status = parsed.metadata.get("status", "")


class IdempotencyKeyReused(CreditsError):
    """The idempotency key was first used with a different request; `field` names what differs."""

    def __init__(self, parsed: _Parsed) -> None:
        super().__init__(parsed)
        self.field = parsed.metadata.get("field", "")


class InvalidArgument(CreditsError):
    """Malformed or out-of-range input. `field_violations` lists (field, description) pairs."""

    def __init__(self, parsed: _Parsed) -> None:
        super().__init__(parsed)
        self.field_violations: list[tuple[str, str]] = list(parsed.field_violations)

    @property
    def fields(self) -> list[str]:
        return [name for name, _ in self.field_violations]


class NotFound(CreditsError):
    """No such reservation for this account."""


class Unavailable(CreditsError):
    """The service or its database could not be reached; nothing was changed. Retry later."""


class Unauthenticated(CreditsError):
    """The call carried no usable credential: `reason` is CREDENTIAL_MISSING,
    CREDENTIAL_INVALID (malformed, unknown or revoked token) or CALLER_DISABLED."""


class PermissionDenied(CreditsError):
    """The caller is known but may not make this call. `reason` SCOPE_MISSING names the
    missing `scope`; ACCOUNT_NOT_ALLOWED means the account is outside the caller's prefixes."""

    def __init__(self, parsed: _Parsed) -> None:
        super().__init__(parsed)
        self.scope = parsed.metadata.get("scope", "")


def error_from_rpc(error: grpc.aio.AioRpcError) -> CreditsError:
    """The typed exception for a failed call, parsed from its rich status and trailers."""
    parsed = _parse(error)
    return _error_class(parsed)(parsed)


def _error_class(parsed: _Parsed) -> type[CreditsError]:
    code = parsed.code
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied
    if code is grpc.StatusCode.ALREADY_EXISTS and parsed.reason == "IDEMPOTENCY_KEY_REUSED":
        return IdempotencyKeyReused
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        if parsed.reason == "INSUFFICIENT_CREDITS":
            return InsufficientCredits
        if parsed.reason == "ACCOUNT_LOCKED":
            return AccountLocked
        if parsed.reason in RESERVATION_STATE_REASONS:
            return ReservationStateError
    return CreditsError


def _parse(error: grpc.aio.AioRpcError) -> _Parsed:
    code = error.code()
    message = error.details() or ""
    request_id = ""
    status: status_pb2.Status | None = None
    for key, value in _trailers(error):
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            request_id = value
        elif key == STATUS_DETAILS_TRAILER and isinstance(value, bytes):
            status = _decode_status(value)
    parsed = _Parsed(code, message, request_id)
    if status is None:
        return parsed
    # The rich status's own message is what the server wrote; prefer it when present.
    return _with_details(replace(parsed, message=status.message or message), status)


def _trailers(error: grpc.aio.AioRpcError) -> list[tuple[str, str | bytes]]:
    # grpc-stubs types trailing_metadata() like the sync API's (objects with .key/.value); grpc.aio
    # really returns an aio.Metadata of (key, value) pairs, or None when the call had no trailers.
    metadata = cast("grpc.aio.Metadata | None", error.trailing_metadata())
    return list(metadata or ())


def _decode_status(data: bytes) -> status_pb2.Status | None:
    try:
        return status_pb2.Status.FromString(data)
    except DecodeError:
        return None  # A garbled trailer still leaves the code and message to go on.


def _with_details(parsed: _Parsed, status: status_pb2.Status) -> _Parsed:
    for packed in status.details:
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if packed.Unpack(info) and info.domain == ERROR_DOMAIN:
            parsed = replace(parsed, reason=info.reason, metadata=dict(info.metadata))
        elif packed.Unpack(bad_request):
            violations = tuple((v.field, v.description) for v in bad_request.field_violations)
            parsed = replace(parsed, field_violations=violations)
        elif packed.Unpack(retry):
            delay_seconds = retry.retry_delay.ToTimedelta().total_seconds()
            parsed = replace(parsed, retry_delay_seconds=delay_seconds)
    return parsed


def _metadata_int(metadata: Mapping[str, str], key: str) -> int:
    """An integer the server put in ErrorInfo metadata; 0 when absent or not a number."""
    try:
        return int(metadata.get(key, "0"))
    except ValueError:
        return 0
