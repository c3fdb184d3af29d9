"""The purchase flow's request: which account buys how many of which pack.

Validated here, before Stripe takes any money, so that a paid session always names an account
and a pack the webhook can grant (an invalid account id would otherwise be found only after the
payment, by the credits server).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from billing import limits
from billing.config import PackPrice
from billing.errors import Refused
from billing.rules import checked_account_id


class PurchaseInvalid(ValueError):
    """The request cannot start a purchase; the message says which field and why."""


@dataclass(frozen=True)
class PurchaseRequest:
    account_id: str
    pack: PackPrice
    quantity: int
    # Passed to Stripe, so a retried request creates one session, not two.
    idempotency_key: str | None


def parse(body: bytes, packs: Mapping[str, PackPrice]) -> PurchaseRequest:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PurchaseInvalid(f"the body is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise PurchaseInvalid(
            'the body must be a JSON object: {"account_id": ..., "price_id": ...}'
        )
    account = document.get("account_id")
    try:
        account_id = checked_account_id(account if isinstance(account, str) else None, "request")
    except Refused as error:
        raise PurchaseInvalid(f"account_id: {error}") from error
    price_id = document.get("price_id")
    pack = packs.get(price_id) if isinstance(price_id, str) else None
    if pack is None:
        raise PurchaseInvalid(f"price_id: {price_id!r} is not a configured pack price")
    quantity = document.get("quantity", 1)
    if (
        isinstance(quantity, bool)
        or not isinstance(quantity, int)
        or not (1 <= quantity <= limits.PACK_QUANTITY_MAX)
    ):
        raise PurchaseInvalid(f"quantity: must be an integer 1..{limits.PACK_QUANTITY_MAX}")
    key = document.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 255):
        raise PurchaseInvalid("idempotency_key: must be a string of 1..255 characters")
    return PurchaseRequest(account_id, pack, quantity, key)
