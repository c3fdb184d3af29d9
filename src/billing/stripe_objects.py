"""Typed views of the Stripe objects the listener acts on, parsed from an event's JSON.

Only the fields the rules need are read, each checked for its type; a payload that does not
have the shape Stripe documents raises `Refused` naming the path of the field. Both the current
API shape (2025-03-31 "basil" and later: `invoice.parent.subscription_details`,
`line.pricing.price_details.price`, `line.parent.*_details.proration`) and the older one
(`invoice.subscription`, `line.price.id`, `line.proration`) are understood, because the shape
of a webhook follows the API version of the endpoint that receives it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from billing import limits
from billing.errors import Refused


class Fields:
    """A JSON object with typed getters; `path` names it in error messages."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data = data
        self.path = path

    def _refuse(self, key: str, expected: str) -> Refused:
        value = self.data.get(key)
        return Refused(f"{self.path}.{key} must be {expected}, got {json.dumps(value)[:80]}")

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self._refuse(key, "a non-empty string")
        if len(value) > limits.STRIPE_ID_LENGTH_MAX:
            raise self._refuse(key, f"at most {limits.STRIPE_ID_LENGTH_MAX} characters")
        return value

    def optional_text(self, key: str) -> str | None:
        if self.data.get(key) is None or self.data.get(key) == "":
            return None
        return self.text(key)

    def reference(self, key: str) -> str | None:
        """An expandable field: an id, or the expanded object carrying one."""
        value = self.data.get(key)
        if isinstance(value, dict):
            return Fields(value, f"{self.path}.{key}").text("id")
        return self.optional_text(key)

    def integer(self, key: str) -> int:
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._refuse(key, "an integer")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.integer(key)

    def boolean(self, key: str) -> bool:
        value = self.data.get(key)
        if not isinstance(value, bool):
            raise self._refuse(key, "true or false")
        return value

    def obj(self, key: str) -> Fields:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise self._refuse(key, "an object")
        return Fields(value, f"{self.path}.{key}")

    def optional_obj(self, key: str) -> Fields | None:
        return None if self.data.get(key) is None else self.obj(key)

    def objects(self, key: str) -> list[Fields]:
        value = self.data.get(key)
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self._refuse(key, "an array of objects")
        return [Fields(item, f"{self.path}.{key}[{index}]") for index, item in enumerate(value)]

    def metadata(self, key: str = "metadata") -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._refuse(key, "an object")
        return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


@dataclass(frozen=True)
class Envelope:
    """A verified event: what the webhook stores and the worker dispatches on."""

    event_id: str
    event_type: str
    livemode: bool
    created_s: int
    obj: Fields


def parse_envelope(payload: str) -> Envelope:
    try:
        document = json.loads(payload)
    except json.JSONDecodeError as error:
        raise Refused(f"the body is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise Refused("the body is not a JSON object")
    event = Fields(document, "event")
    if document.get("object") != "event":
        raise Refused(f"event.object must be 'event', got {json.dumps(document.get('object'))}")
    event_id = event.text("id")
    if not event_id.startswith("evt_") or len(event_id) > limits.EVENT_ID_LENGTH_MAX:
        raise Refused(f"event.id must be an event id (evt_...), got {event_id[:80]!r}")
    event_type = event.text("type")
    if len(event_type) > limits.EVENT_TYPE_LENGTH_MAX:
        raise Refused(f"event.type is longer than {limits.EVENT_TYPE_LENGTH_MAX} characters")
    return Envelope(
        event_id=event_id,
        event_type=event_type,
        livemode=event.boolean("livemode"),
        created_s=event.integer("created"),
        obj=event.obj("data").obj("object"),
    )


# ---- Checkout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckoutSession:
    session_id: str
    mode: str
    payment_status: str
    # client_reference_id, else metadata.account_id; None when neither is set.
    account_id: str | None
    metadata: Mapping[str, str]
    payment_intent: str | None
    subscription_id: str | None


def checkout_session(obj: Fields) -> CheckoutSession:
    metadata = obj.metadata()
    return CheckoutSession(
        session_id=obj.text("id"),
        mode=obj.text("mode"),
        payment_status=obj.text("payment_status"),
        account_id=obj.optional_text("client_reference_id") or metadata.get("account_id"),
        metadata=metadata,
        payment_intent=obj.reference("payment_intent"),
        subscription_id=obj.reference("subscription"),
    )


@dataclass(frozen=True)
class LineItem:
    """One priced line of a Checkout Session."""

    price_id: str
    quantity: int


# ---- invoices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InvoiceLine:
    price_id: str | None
    quantity: int
    # Stripe's signed amount in minor units: negative for "unused time" proration credits.
    amount: int
    proration: bool
    period_start_s: int
    period_end_s: int


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    billing_reason: str
    subscription_id: str | None
    # subscription metadata (as of the invoice) or invoice metadata account_id.
    account_id: str | None
    lines: tuple[InvoiceLine, ...]
    lines_complete: bool
    # Only in the pre-2025 API shape; lets refunds and disputes find subscription grants.
    payment_intent: str | None


def invoice(obj: Fields) -> Invoice:
    subscription_id, subscription_metadata = _invoice_subscription(obj)
    lines = obj.obj("lines")
    return Invoice(
        invoice_id=obj.text("id"),
        billing_reason=obj.optional_text("billing_reason") or "",
        subscription_id=subscription_id,
        account_id=subscription_metadata.get("account_id") or obj.metadata().get("account_id"),
        lines=tuple(_invoice_line(line) for line in lines.objects("data")),
        lines_complete=not bool(lines.data.get("has_more")),
        payment_intent=obj.reference("payment_intent"),
    )


def _invoice_subscription(obj: Fields) -> tuple[str | None, dict[str, str]]:
    parent = obj.optional_obj("parent")
    details = parent.optional_obj("subscription_details") if parent is not None else None
    if details is not None and details.data.get("subscription") is not None:
        return details.reference("subscription"), details.metadata()
    # The older shape: invoice.subscription and invoice.subscription_details.metadata.
    legacy = obj.optional_obj("subscription_details")
    return obj.reference("subscription"), legacy.metadata() if legacy is not None else {}


def _invoice_line(line: Fields) -> InvoiceLine:
    period = line.obj("period")
    return InvoiceLine(
        price_id=_line_price(line),
        quantity=line.optional_integer("quantity") or 1,
        amount=line.integer("amount"),
        proration=_line_proration(line),
        period_start_s=period.integer("start"),
        period_end_s=period.integer("end"),
    )


def _line_price(line: Fields) -> str | None:
    pricing = line.optional_obj("pricing")
    details = pricing.optional_obj("price_details") if pricing is not None else None
    if details is not None:
        return details.reference("price")
    return line.reference("price")


def _line_proration(line: Fields) -> bool:
    parent = line.optional_obj("parent")
    if parent is not None:
        kind = parent.optional_text("type")
        details = parent.optional_obj(kind) if kind is not None else None
        if details is not None and details.data.get("proration") is not None:
            return details.boolean("proration")
    return bool(line.data.get("proration"))


# ---- subscriptions, charges, disputes -------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionEnded:
    subscription_id: str
    account_id: str | None
    ended_at_s: int


def subscription_ended(obj: Fields, event_created_s: int) -> SubscriptionEnded:
    return SubscriptionEnded(
        subscription_id=obj.text("id"),
        account_id=obj.metadata().get("account_id"),
        ended_at_s=obj.optional_integer("ended_at")
        or obj.optional_integer("canceled_at")
        or event_created_s,
    )


@dataclass(frozen=True)
class Charge:
    charge_id: str
    payment_intent: str | None
    # Minor currency units, as Stripe counts them.
    amount: int
    amount_refunded: int


def charge(obj: Fields) -> Charge:
    return Charge(
        charge_id=obj.text("id"),
        payment_intent=obj.reference("payment_intent"),
        amount=obj.integer("amount"),
        amount_refunded=obj.integer("amount_refunded"),
    )


@dataclass(frozen=True)
class Dispute:
    dispute_id: str
    charge_id: str
    payment_intent: str | None
    status: str


def dispute(obj: Fields) -> Dispute:
    return Dispute(
        dispute_id=obj.text("id"),
        charge_id=obj.reference("charge") or "",
        payment_intent=obj.reference("payment_intent"),
        status=obj.text("status"),
    )
