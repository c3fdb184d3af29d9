"""What every RPC shares: request id, deadline, logging, and turning failures into statuses.

The handlers are registered with a decoder that never raises (`decoder`), so a request whose
bytes are not a valid message gets INVALID_ARGUMENT instead of gRPC's default INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from server.logs import REQUEST_ID
from server.status import bad_request, from_ledger_error, rich_status
from store import limits
from store.errors import LedgerError

log = logging.getLogger("credits.rpc")
REQUEST_ID_HEADER = "x-request-id"

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    error: str


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


def call_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's x-request-id when it is sane, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key != REQUEST_ID_HEADER or not isinstance(value, str):
            continue
        sane_length = 0 < len(value) <= limits.REQUEST_ID_LENGTH_MAX
        if sane_length and limits.VISIBLE_ASCII_PATTERN.fullmatch(value):
            return value
    return uuid.uuid4().hex


async def run_rpc(
    method: str,
    request: object,
    context: grpc.aio.ServicerContext[Any, Any],
    work: Callable[[Any, str], Awaitable[ResponseT]],
) -> ResponseT:
    request_id = call_request_id(context)
    token = REQUEST_ID.set(request_id)
    started = time.perf_counter()
    status: grpc.Status | None = None
    try:
        if isinstance(request, Undecodable):
            status = bad_request(
                [("request", f"is not a valid {method} request message ({request.error})")],
                "invalid request: the request bytes could not be decoded",
            )
        else:
            # Stop working once the caller has stopped waiting; the transaction rolls back.
            async with asyncio.timeout(context.time_remaining()):
                response = await work(request, request_id)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            return response
    except LedgerError as error:
        status = from_ledger_error(error)
    except TimeoutError:
        status = rich_status(
            code_pb2.DEADLINE_EXCEEDED,
            "the call's deadline passed before the ledger answered; retry with the same "
            "idempotency key to learn the outcome",
            [],
        )
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
        log.log(
            logging.DEBUG if status is None else logging.INFO,
            "%s %s",
            method,
            code,
            extra={"fields": {"method": method, "code": code, "elapsed_ms": round(elapsed_ms, 3)}},
        )
        REQUEST_ID.reset(token)
    assert status is not None
    await context.abort(
        status.code,
        status.details,
        (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id)),
    )
    raise AssertionError("abort raises")
