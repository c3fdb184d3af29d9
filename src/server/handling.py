"""What every RPC shares: request id, deadline, logging, and turning failures into statuses.

The handlers are registered with a decoder that never raises (`decoder`), so a request whose
bytes are not a valid message gets INVALID_ARGUMENT instead of gRPC's default INTERNAL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from server import metrics
from server.auth import Authenticator, AuthFailure
from server.logs import REQUEST_ID
from server.ratelimit import RateLimitedCall, RateLimitGate
from server.status import bad_request, from_ledger_error, rich_status
from store import limits
from store.callers import CallerRecord
from store.errors import LedgerError

log = logging.getLogger("credits.rpc")
REQUEST_ID_HEADER = "x-request-id"

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    error: str


@dataclass(frozen=True)
class Call:
    """What run_rpc hands the handler's work: the call's request id and its authorized caller."""

    request_id: str
    caller: CallerRecord


class MessageClass(Protocol):
    @staticmethod
    def FromString(data: bytes) -> Any: ...  # noqa: N802 - protobuf's name


def decoder(message_class: MessageClass) -> Callable[[bytes], object]:
    def decode(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the caller's bad input
            return Undecodable(f"{type(error).__name__}: {str(error)[:200]}")

    return decode


@dataclass(frozen=True)
class CallPolicy:
    """What every call passes before any work: who is calling (and may they), and whether
    their spend rate allows it now."""

    authenticator: Authenticator
    rate_gate: RateLimitGate | None = None
    # Methods whose rate checks the ledger makes itself, once per group-commit batch.
    limited_by_ledger: frozenset[str] = frozenset()


# Reads answer without the x-request-id trailer when they succeed: nothing of theirs is journaled,
# and each metadata operation costs a measurable share of a cached read (docs/performance.md).
# Failures always carry it.
QUIET_READS = frozenset({"CheckCredits", "History"})


def call_request_id(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The caller's x-request-id when it is sane, else a fresh one."""
    for key, value in metadata:
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        sane_length = 0 < len(value) <= limits.REQUEST_ID_LENGTH_MAX
        if sane_length and limits.VISIBLE_ASCII_PATTERN.fullmatch(value):
            return value
    return f"{_REQUEST_ID_STEM}{next(_request_numbers):016x}"


# Request ids the server makes up: 16 random hex digits per process, then a counter (32 hex
# digits in all, as a UUID's). Unique without a system call per call, which uuid4 makes.
_REQUEST_ID_STEM = secrets.token_hex(8)
_request_numbers = itertools.count()


async def run_rpc(
    method: str,
    request: object,
    context: grpc.aio.ServicerContext[Any, Any],
    policy: CallPolicy,
    work: Callable[[Any, Call], Awaitable[ResponseT]],
) -> ResponseT:
    # Read once: each call of invocation_metadata() builds the tuples anew.
    metadata: tuple[tuple[str, str | bytes], ...] = tuple(context.invocation_metadata() or ())
    request_id = call_request_id(metadata)
    token = REQUEST_ID.set(request_id)
    started = time.perf_counter()
    status: grpc.Status | None = None
    # Who is calling, once authenticated and allowed this method on this account.
    caller: CallerRecord | None = None
    try:
        caller = await policy.authenticator.authorize(method, request, context, metadata)
        if policy.rate_gate is not None and method not in policy.limited_by_ledger:
            # Refused calls take nothing: a client retrying after RetryInfo's delay gets in.
            status = await policy.rate_gate.check(
                caller=caller.name, method=method, request=request
            )
        if status is not None:
            pass
        elif isinstance(request, Undecodable):
            status = bad_request(
                [("request", f"is not a valid {method} request message ({request.error})")],
                "invalid request: the request bytes could not be decoded",
            )
        else:
            # Stop working once the caller has stopped waiting; the transaction rolls back.
            async with asyncio.timeout(context.time_remaining()):
                response = await work(request, Call(request_id, caller))
            if method not in QUIET_READS:
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            return response
    except AuthFailure as failure:
        status = failure.status
    except RateLimitedCall as refused:
        status = refused.status
    except LedgerError as error:
        status = from_ledger_error(error)
    except TimeoutError:
        status = rich_status(
            code_pb2.DEADLINE_EXCEEDED,
            "the call's deadline passed before the ledger answered; retry with the same "
            "idempotency key to learn the outcome",
            [],
        )
    except asyncio.CancelledError:
        # The client went away (or the server is stopping): record it as such, not as OK.
        status = rich_status(code_pb2.CANCELLED, "the call was cancelled", [])
        raise
    except Exception:
        log.exception("unexpected failure in %s", method)
        status = rich_status(
            code_pb2.INTERNAL,
            f"internal error; nothing half-applied was kept. Quote request id {request_id}",
            [],
        )
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        code = "OK" if status is None else status.code.name
        metrics.observe_rpc(method, code, elapsed_ms / 1000)
        level = logging.DEBUG if status is None else logging.INFO
        # Successful calls log at DEBUG, off in production: their fields are not built at all.
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s",
                method,
                code,
                extra={
                    "fields": {
                        "method": method,
                        "code": code,
                        "elapsed_ms": round(elapsed_ms, 3),
                        "caller": "" if caller is None else caller.name,
                    }
                },
            )
        REQUEST_ID.reset(token)
    assert status is not None
    await context.abort(
        status.code,
        status.details,
        (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id)),
    )
    raise AssertionError("abort raises")
