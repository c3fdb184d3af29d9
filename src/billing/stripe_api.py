"""The two calls the listener makes to Stripe's API, through the `stripe` library (async).

`api_base` points the library elsewhere than https://api.stripe.com (tests run a local fake).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import stripe

from billing import limits
from billing.errors import Refused, RetryLater
from billing.stripe_objects import LineItem


@dataclass(frozen=True)
class CheckoutStarted:
    session_id: str
    url: str


class StripeApi:
    def __init__(self, api_key: str, api_base: str) -> None:
        assert api_key, "a StripeApi needs an API key"
        self._http = stripe.AIOHTTPClient(timeout=limits.STRIPE_API_TIMEOUT_SECONDS)
        self._client = stripe.StripeClient(
            api_key,
            http_client=self._http,
            base_addresses={"api": api_base},
            max_network_retries=limits.STRIPE_NETWORK_RETRIES,
        )

    async def close(self) -> None:
        # The library leaves this one method unannotated.
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def line_items(self, session_id: str) -> list[LineItem]:
        """Every priced line of a Checkout Session, page by page, at most LINE_ITEMS_MAX."""
        items: list[LineItem] = []
        starting_after: str | None = None
        while True:
            try:
                page = await self._client.v1.checkout.sessions.line_items.list_async(
                    session_id,
                    {"limit": limits.LINE_ITEMS_PAGE_SIZE, "starting_after": starting_after}
                    if starting_after
                    else {"limit": limits.LINE_ITEMS_PAGE_SIZE},
                )
            except stripe.InvalidRequestError as error:
                # 4xx: the session is unknown to this key (wrong account or mode).
                raise Refused(
                    f"Stripe refused listing the line items of {session_id}: {error}"
                ) from error
            except stripe.StripeError as error:
                raise RetryLater(
                    f"Stripe API: listing line items of {session_id}: {error}"
                ) from error
            for item in page.data:
                if item.price is not None:
                    items.append(LineItem(item.price.id, item.quantity or 1))
                starting_after = item.id
            if not page.has_more or not page.data:
                return items
            if len(items) >= limits.LINE_ITEMS_MAX:
                raise Refused(f"session {session_id} has more than {limits.LINE_ITEMS_MAX} lines")

    async def create_checkout_session(
        self,
        *,
        account_id: str,
        price_id: str,
        quantity: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str | None,
    ) -> CheckoutStarted:
        """A hosted Checkout page selling `quantity` units of the pack `price_id` to the account.

        client_reference_id and metadata carry the account, the price and the quantity: the
        webhook finds the account there, and can count the credits without an API call."""
        metadata: Mapping[str, str] = {
            "account_id": account_id,
            "price_id": price_id,
            "quantity": str(quantity),
        }
        session = await self._client.v1.checkout.sessions.create_async(
            {
                "mode": "payment",
                "line_items": [{"price": price_id, "quantity": quantity}],
                "client_reference_id": account_id,
                "success_url": success_url,
                "cancel_url": cancel_url,
                "metadata": dict(metadata),
                "payment_intent_data": {"metadata": {"account_id": account_id}},
            },
            {"idempotency_key": idempotency_key} if idempotency_key else None,
        )
        if not session.url:
            raise RetryLater(f"Stripe created session {session.id} without a URL")
        return CheckoutStarted(session.id, session.url)
