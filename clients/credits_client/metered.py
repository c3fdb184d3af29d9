"""Reserve → work → commit (or release on failure), as one `async with` block.

    async with client.metered("user:42", 10, idempotency_key=key, action="ai.chat") as hold:
        tokens = await run_model()
        hold.actual = cost_of(tokens)  # optional: charge less than was held

On normal exit the hold is committed for `hold.actual` (all of it when unset). If the block
raises (cancellation included) the hold is released in full and the exception propagates; a
failure to release is attached to it as a note rather than hiding it (the hold then expires at
its TTL). A failed commit propagates and is not followed by a release: the reservation stays
pending until it is committed again or expires.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from credits.v1 import credits_pb2
from credits_client.errors import CreditsError

if TYPE_CHECKING:
    from credits_client.client import CreditsClient


class Hold:
    """A pending reservation inside a `metered` block, and how it was resolved after it."""

    def __init__(self, reservation: credits_pb2.Reservation) -> None:
        self.reservation = reservation
        self._actual: int | None = None
        # Set when the block exits: exactly one of them.
        self.committed: credits_pb2.CommitResponse | None = None
        self.released: credits_pb2.ReleaseResponse | None = None

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def amount(self) -> int:
        """Credits held."""
        return self.reservation.amount

    @property
    def actual(self) -> int | None:
        """Credits to charge on exit; None charges the whole hold."""
        return self._actual

    @actual.setter
    def actual(self, amount: int | None) -> None:
        # Checked here, inside the block, so a bad amount releases the hold instead of leaving it
        # pending after a commit the server would refuse.
        if amount is not None and not 0 <= amount <= self.amount:
            raise ValueError(f"actual must be between 0 and the {self.amount} held, got {amount}")
        self._actual = amount


class Metered:
    """The async context manager `CreditsClient.metered` returns."""

    def __init__(
        self,
        client: CreditsClient,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        action: str,
        credit_type: str,
        ttl_seconds: int,
        request_id: str,
        metadata: Mapping[str, str] | None,
        timeout_seconds: float,
    ) -> None:
        self._client = client
        self._account_id = account_id
        self._amount = amount
        self._idempotency_key = idempotency_key
        self._action = action
        self._credit_type = credit_type
        self._ttl_seconds = ttl_seconds
        self._request_id = request_id
        self._metadata = metadata
        self._timeout_seconds = timeout_seconds
        self._hold: Hold | None = None

    async def __aenter__(self) -> Hold:
        assert self._hold is None, "a metered block can be entered once"
        reserved = await self._client.reserve(
            self._account_id,
            self._amount,
            idempotency_key=self._idempotency_key,
            credit_type=self._credit_type,
            ttl_seconds=self._ttl_seconds,
            action=self._action,
            request_id=self._request_id,
            metadata=self._metadata,
            timeout_seconds=self._timeout_seconds,
        )
        self._hold = Hold(reserved.reservation)
        return self._hold

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        hold = self._hold
        assert hold is not None, "__aexit__ without a successful __aenter__"
        if exc is None:
            hold.committed = await self._client.commit(
                self._account_id,
                hold.reservation_id,
                hold.actual,
                request_id=self._request_id,
                timeout_seconds=self._timeout_seconds,
            )
            return
        try:
            hold.released = await self._client.release(
                self._account_id,
                hold.reservation_id,
                request_id=self._request_id,
                timeout_seconds=self._timeout_seconds,
            )
        except CreditsError as release_error:
            # The block's own exception is what the caller needs to see; the hold expires at its
            # TTL anyway.
            exc.add_note(f"releasing reservation {hold.reservation_id!r} failed: {release_error}")
