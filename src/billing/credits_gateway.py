"""The credits service as the listener uses it: AddCredits, ClawBack, SetAccountStatus.

AddCredits goes through the client library (clients/credits_client); ClawBack and
SetAccountStatus, which the library does not wrap yet, through the generated stub on the same
channel, with the library's own error parsing. Every call carries the listener's own bearer
token (CREDITS_LISTENER_TOKEN). Failures become `RetryLater` (nothing changed; the same request
with the same key may be sent again) or `Refused` (the server said no to this request, and will
say it again). UNAUTHENTICATED and PERMISSION_DENIED are RetryLater: once an operator fixes the
token or its scopes, the same event succeeds.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import grpc
from credits_client import CreditsClient, CreditsError, error_from_rpc

from billing import limits
from billing.errors import ProcessingError, Refused, RetryLater
from billing.rules import GrantPlan
from credits.v1 import credits_pb2, credits_pb2_grpc

T = TypeVar("T")

# The server refuses these for the request itself: sending it again changes nothing.
_REFUSED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

_SOURCES: dict[str, credits_pb2.GrantSource.ValueType] = {
    "purchase": credits_pb2.GRANT_SOURCE_PURCHASE,
    "allocation": credits_pb2.GRANT_SOURCE_SUBSCRIPTION,
    "upgrade": credits_pb2.GRANT_SOURCE_SUBSCRIPTION,
}
_ACTIONS = {
    "purchase": "stripe.checkout",
    "allocation": "stripe.subscription",
    "upgrade": "stripe.subscription.upgrade",
}


@dataclass(frozen=True)
class ClawedBack:
    amount_clawed_back: int
    shortfall: int


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.initial_reconnect_backoff_ms", limits.GRPC_RECONNECT_BACKOFF_MAX_MS // 4),
            ("grpc.min_reconnect_backoff_ms", limits.GRPC_RECONNECT_BACKOFF_MAX_MS // 4),
            ("grpc.max_reconnect_backoff_ms", limits.GRPC_RECONNECT_BACKOFF_MAX_MS),
        ],
    )


class CreditsGateway:
    def __init__(self, channel: grpc.aio.Channel, token: str = "") -> None:
        """`token`: the listener's bearer token (CREDITS_LISTENER_TOKEN); empty sends none."""
        self._client = CreditsClient(channel, token=token or None)
        self._auth_metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._stub: credits_pb2_grpc.CreditsServiceAsyncStub = credits_pb2_grpc.CreditsServiceStub(
            channel
        )

    async def add_credits(self, plan: GrantPlan, request_id: str) -> str:
        """Makes the grant (or finds the one its key already made); returns its grant id."""
        expires_at = (
            None if plan.expires_at_s is None else datetime.fromtimestamp(plan.expires_at_s, UTC)
        )
        response = await _translated(
            f"AddCredits {plan.amount} {plan.credit_type} credits to {plan.account_id} "
            f"(key {plan.idempotency_key})",
            self._client.add_credits(
                plan.account_id,
                plan.amount,
                idempotency_key=plan.idempotency_key,
                source=_SOURCES[plan.kind],
                credit_type=plan.credit_type,
                expires_at=expires_at,
                external_ref=plan.stripe_ref,
                metadata=plan.metadata,
                action=_ACTIONS[plan.kind],
                request_id=request_id,
                timeout_seconds=limits.CREDITS_RPC_TIMEOUT_SECONDS,
            ),
        )
        assert response.grant.grant_id, "AddCredits answers with the grant"
        assert response.grant.amount == plan.amount, (
            f"the grant under key {plan.idempotency_key} has {response.grant.amount} credits, "
            f"the request asked {plan.amount}"
        )
        return response.grant.grant_id

    async def claw_back(
        self, account_id: str, grant_id: str, amount: int, idempotency_key: str, request_id: str
    ) -> ClawedBack:
        request = credits_pb2.ClawBackRequest(
            account_id=account_id,
            grant_id=grant_id,
            amount=amount,
            idempotency_key=idempotency_key,
            action="stripe.refund",
            request_id=request_id,
        )
        response = await _translated(
            f"ClawBack {amount} credits of grant {grant_id} of {account_id}",
            self._call(
                self._stub.ClawBack(
                    request,
                    timeout=limits.CREDITS_RPC_TIMEOUT_SECONDS,
                    metadata=(*self._auth_metadata, *_request_metadata(request_id)),
                )
            ),
        )
        assert response.amount_clawed_back + response.shortfall == amount, response
        return ClawedBack(response.amount_clawed_back, response.shortfall)

    async def set_locked(self, account_id: str, locked: bool, reason: str, request_id: str) -> bool:
        """Locks or unlocks the account; False when it already was."""
        status = credits_pb2.ACCOUNT_STATUS_LOCKED if locked else credits_pb2.ACCOUNT_STATUS_ACTIVE
        request = credits_pb2.SetAccountStatusRequest(
            account_id=account_id,
            status=status,
            reason=reason[: limits.ACCOUNT_STATUS_REASON_LENGTH_MAX],
        )
        response = await _translated(
            f"SetAccountStatus {'LOCKED' if locked else 'ACTIVE'} for {account_id}",
            self._call(
                self._stub.SetAccountStatus(
                    request,
                    timeout=limits.CREDITS_RPC_TIMEOUT_SECONDS,
                    metadata=(*self._auth_metadata, *_request_metadata(request_id)),
                )
            ),
        )
        return response.changed

    @staticmethod
    async def _call(call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error


def _request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    # The server logs and journals the request id: the Stripe event id, for tracing.
    return (("x-request-id", request_id),) if request_id else ()


async def _translated(what: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except CreditsError as error:
        kind: type[ProcessingError] = Refused if error.code in _REFUSED_CODES else RetryLater
        raise kind(f"{what}: {error.code.name}: {error.message}") from error
