"""An asyncio client for the credits service: one method per RPC, typed errors, bounded deadlines.

Every method returns the protobuf response unchanged (typed by the generated .pyi stubs) and
raises a `CreditsError` subclass (see errors.py) when the call fails. Every call carries a
deadline (`timeout_seconds`, 5 s unless told otherwise), the client's bearer token (`token=`)
as an `authorization` header, and, when `request_id` is given, an `x-request-id` header that the
server logs, journals and echoes back.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credits_pb2, credits_pb2_grpc
from credits_client.errors import AUTHORIZATION_HEADER, REQUEST_ID_HEADER, error_from_rpc
from credits_client.metered import Metered

# Limits, named in one place (STYLE.md: put a limit on everything).
DEFAULT_TIMEOUT_SECONDS = 5.0
# A deadline longer than this is a mistake: no RPC of this service legitimately takes minutes.
MAX_TIMEOUT_SECONDS = 300.0
# iter_history stops after this many pages unless told otherwise (500 entries a page at most).
DEFAULT_MAX_PAGES = 100

# What a bearer token may hold: visible ASCII, at least one character.
_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")

# An enum value, or its short name ("purchase", "hold_expiry").
GrantSourceLike: TypeAlias = "str | credits_pb2.GrantSource.ValueType"
EntryKindLike: TypeAlias = "str | credits_pb2.EntryKind.ValueType"

ResponseT = TypeVar("ResponseT", bound=Message)
RequestT = TypeVar("RequestT", bound=Message)


class CreditsClient:
    """A client for one credits service endpoint.

    Built from an address ("host:port"; the client opens and closes the channel) or from an
    existing `grpc.aio.Channel` (the caller keeps owning it). Use as `async with`, or call
    `close()`. `token` is the caller's bearer token (`credits-server callers token-create`),
    sent on every call; leave it out on a mutual-TLS channel whose client certificate names the
    caller. Outside one host, send tokens only over TLS (`credentials=`).
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        if token is not None and not _TOKEN_PATTERN.fullmatch(token):
            raise ValueError(
                "token must be the bare token (visible ASCII, no spaces, no 'Bearer ' prefix)"
            )
        self._auth_metadata: tuple[tuple[str, str], ...] = (
            () if token is None else ((AUTHORIZATION_HEADER, f"Bearer {token}"),)
        )
        if isinstance(target, str):
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(target, credentials, options=options)
            self._owns_channel = True
        else:
            if credentials is not None or options is not None:
                raise ValueError("credentials and options configure a channel the client opens")
            self._channel = target
            self._owns_channel = False
        self._stub: credits_pb2_grpc.CreditsServiceAsyncStub = credits_pb2_grpc.CreditsServiceStub(
            self._channel
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close(grace=None)

    async def check(
        self,
        account_id: str,
        amount: int = 0,
        *,
        credit_type: str = "",
        consistent: bool = False,
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.CheckCreditsResponse:
        """May `account_id` spend `amount` credits now? "Not enough" is an answer, not an error."""
        request = credits_pb2.CheckCreditsRequest(
            account_id=account_id, credit_type=credit_type, amount=amount, consistent=consistent
        )
        return await _call(
            self._stub.CheckCredits, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def reserve(
        self,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        credit_type: str = "",
        ttl_seconds: int = 0,
        action: str = "",
        request_id: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.ReserveResponse:
        """Holds `amount` credits for work in flight (all or nothing). ttl_seconds 0: server's."""
        request = credits_pb2.ReserveRequest(
            account_id=account_id,
            credit_type=credit_type,
            amount=amount,
            idempotency_key=idempotency_key,
            ttl_seconds=ttl_seconds,
            action=action,
            request_id=request_id,
            metadata=metadata,
        )
        return await _call(
            self._stub.Reserve, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def commit(
        self,
        account_id: str,
        reservation_id: str,
        amount: int | None = None,
        *,
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.CommitResponse:
        """Charges the reservation `amount` (None: all of it); the rest goes back."""
        request = credits_pb2.CommitRequest(
            account_id=account_id, reservation_id=reservation_id, amount=amount
        )
        return await _call(
            self._stub.Commit, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def release(
        self,
        account_id: str,
        reservation_id: str,
        *,
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.ReleaseResponse:
        """Gives the whole reservation back. Repeating it is harmless."""
        request = credits_pb2.ReleaseRequest(account_id=account_id, reservation_id=reservation_id)
        return await _call(
            self._stub.Release, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def set_account_status(
        self,
        account_id: str,
        *,
        locked: bool,
        reason: str = "",
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.SetAccountStatusResponse:
        """Locks (no new reservations) or unlocks an account; `changed` is False when it
        already had that status."""
        request = credits_pb2.SetAccountStatusRequest(
            account_id=account_id,
            status=credits_pb2.ACCOUNT_STATUS_LOCKED
            if locked
            else credits_pb2.ACCOUNT_STATUS_ACTIVE,
            reason=reason,
        )
        return await _call(
            self._stub.SetAccountStatus, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def claw_back(
        self,
        account_id: str,
        grant_id: str,
        amount: int,
        *,
        idempotency_key: str,
        action: str = "",
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.ClawBackResponse:
        """Takes back up to `amount` unspent credits of a grant; what it could not take is the
        response's `shortfall`."""
        request = credits_pb2.ClawBackRequest(
            account_id=account_id,
            grant_id=grant_id,
            amount=amount,
            idempotency_key=idempotency_key,
            action=action,
            request_id=request_id,
        )
        return await _call(
            self._stub.ClawBack, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def add_credits(
        self,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        source: GrantSourceLike,
        credit_type: str = "",
        priority: int | None = None,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        external_ref: str = "",
        metadata: Mapping[str, str] | None = None,
        action: str = "",
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.AddCreditsResponse:
        """Adds a grant. `source` is a GrantSource value or its short name ("purchase")."""
        request = credits_pb2.AddCreditsRequest(
            account_id=account_id,
            credit_type=credit_type,
            amount=amount,
            idempotency_key=idempotency_key,
            source=grant_source(source),
            priority=priority,
            effective_at=_timestamp(effective_at),
            expires_at=_timestamp(expires_at),
            external_ref=external_ref,
            metadata=metadata,
            action=action,
            request_id=request_id,
        )
        return await _call(
            self._stub.AddCredits, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def history(
        self,
        account_id: str,
        *,
        credit_type: str = "",
        kinds: Iterable[EntryKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reservation_id: str = "",
        action: str = "",
        page_size: int = 0,
        page_token: str = "",
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> credits_pb2.HistoryResponse:
        """One page of the journal, newest first. `kinds` are EntryKind values or short names."""
        request = credits_pb2.HistoryRequest(
            account_id=account_id,
            credit_type=credit_type,
            kinds=[entry_kind(kind) for kind in kinds],
            start_time=_timestamp(start_time),
            end_time=_timestamp(end_time),
            reservation_id=reservation_id,
            action=action,
            page_size=page_size,
            page_token=page_token,
        )
        return await _call(
            self._stub.History, request, request_id, timeout_seconds, self._auth_metadata
        )

    async def iter_history(
        self,
        account_id: str,
        *,
        credit_type: str = "",
        kinds: Iterable[EntryKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reservation_id: str = "",
        action: str = "",
        page_size: int = 0,
        max_pages: int = DEFAULT_MAX_PAGES,
        request_id: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> AsyncIterator[credits_pb2.JournalEntry]:
        """Every matching journal entry, newest first, following page tokens.

        Stops after `max_pages` pages even if the server has more; each page gets its own
        `timeout_seconds` deadline.
        """
        if max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {max_pages}")
        kinds = list(kinds)  # Iterated once per page.
        page_token = ""
        for _ in range(max_pages):
            page = await self.history(
                account_id,
                credit_type=credit_type,
                kinds=kinds,
                start_time=start_time,
                end_time=end_time,
                reservation_id=reservation_id,
                action=action,
                page_size=page_size,
                page_token=page_token,
                request_id=request_id,
                timeout_seconds=timeout_seconds,
            )
            for entry in page.entries:
                yield entry
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def metered(
        self,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        action: str = "",
        credit_type: str = "",
        ttl_seconds: int = 0,
        request_id: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> Metered:
        """`async with client.metered(...) as hold:` reserves on enter, commits on normal exit
        (`hold.actual` if set, else all of it) and releases if the block raises."""
        return Metered(
            self,
            account_id,
            amount,
            idempotency_key=idempotency_key,
            action=action,
            credit_type=credit_type,
            ttl_seconds=ttl_seconds,
            request_id=request_id,
            metadata=metadata,
            timeout_seconds=timeout_seconds,
        )


def grant_source(source: GrantSourceLike) -> credits_pb2.GrantSource.ValueType:
    """A GrantSource from its value or its short name ("purchase", "promotion", ...)."""
    if isinstance(source, str):
        return credits_pb2.GrantSource.Value(_enum_name("GRANT_SOURCE_", source))
    return source


def entry_kind(kind: EntryKindLike) -> credits_pb2.EntryKind.ValueType:
    """An EntryKind from its value or its short name ("grant", "commit", "hold_expiry", ...)."""
    if isinstance(kind, str):
        return credits_pb2.EntryKind.Value(_enum_name("ENTRY_KIND_", kind))
    return kind


def _enum_name(prefix: str, name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith(prefix) else prefix + upper


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone; pass an aware datetime (e.g. UTC)")
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def _call_metadata(
    request_id: str, auth_metadata: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    return (*auth_metadata, *(((REQUEST_ID_HEADER, request_id),) if request_id else ()))


async def _call(
    method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
    request: RequestT,
    request_id: str,
    timeout_seconds: float,
    auth_metadata: tuple[tuple[str, str], ...] = (),
) -> ResponseT:
    if not (math.isfinite(timeout_seconds) and 0 < timeout_seconds <= MAX_TIMEOUT_SECONDS):
        raise ValueError(
            f"timeout_seconds must be in (0, {MAX_TIMEOUT_SECONDS}], got {timeout_seconds}"
        )
    try:
        return await method(
            request,
            timeout=timeout_seconds,
            metadata=_call_metadata(request_id, auth_metadata),
        )
    except grpc.aio.AioRpcError as error:
        raise error_from_rpc(error) from error
