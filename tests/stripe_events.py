"""Stripe events for the listener's tests, built from the real object shapes in
tests/stripe_fixtures/ (Stripe's published OpenAPI fixtures, kept in the repository so that a
clone anywhere runs them), signed the way Stripe signs them; and a fake of the two Stripe API
endpoints the listener calls (faked at the HTTP level: the real `stripe` library talks to it).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import pathlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FIXTURES = pathlib.Path(__file__).resolve().parent / "stripe_fixtures"

Json = dict[str, Any]


def fixture(name: str) -> Json:
    """A fresh copy of one fixture object (e.g. "checkout_session")."""
    document = json.loads((FIXTURES / f"{name}.json").read_text())
    assert isinstance(document, dict)
    return copy.deepcopy(document)


def new_id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(8)}"


def event(event_type: str, obj: Json, *, livemode: bool = False, event_id: str = "") -> Json:
    """obj wrapped in event.json's envelope, with a new event id."""
    envelope = fixture("event")
    envelope.update(
        id=event_id or new_id("evt"),
        type=event_type,
        created=int(time.time()),
        livemode=livemode,
        data={"object": obj},
    )
    return envelope


def signature_header(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """Stripe's scheme, written out (not the library's helper, so the test checks the library
    against an independent implementation): t=<unix time>,v1=<hex HMAC-SHA256 of "t.payload">."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# ---- objects ---------------------------------------------------------------------------------


def checkout_session(
    session_id: str,
    account_id: str | None,
    *,
    payment_status: str = "paid",
    mode: str = "payment",
    payment_intent: str | None = None,
    metadata: dict[str, str] | None = None,
    subscription: str | None = None,
) -> Json:
    session = fixture("checkout_session")
    session.update(
        id=session_id,
        client_reference_id=account_id,
        payment_status=payment_status,
        status="complete",
        mode=mode,
        payment_intent=payment_intent,
        metadata=metadata or {},
        subscription=subscription,
    )
    return session


def invoice_line(
    price_id: str,
    period_start_s: int,
    period_end_s: int,
    *,
    quantity: int = 1,
    amount: int = 2000,
    proration: bool = False,
) -> Json:
    line = fixture("invoice")["lines"]["data"][0]
    line.update(id=new_id("il"), amount=amount, quantity=quantity)
    line["period"] = {"start": period_start_s, "end": period_end_s}
    line["pricing"] = {
        "type": "price_details",
        "price_details": {"price": price_id, "product": "prod_QXg1hqf4jFNsqG"},
        "unit_amount_decimal": str(amount),
    }
    parent = line["parent"]
    parent["type"] = "subscription_item_details"
    parent["subscription_item_details"]["proration"] = proration
    return line


def invoice(
    invoice_id: str,
    subscription_id: str,
    lines: Sequence[Json],
    *,
    account_id: str | None,
    billing_reason: str = "subscription_cycle",
) -> Json:
    obj = fixture("invoice")
    obj.update(
        id=invoice_id,
        billing_reason=billing_reason,
        status="paid",
        amount_paid=sum(line["amount"] for line in lines),
        period_start=min(line["period"]["start"] for line in lines),
        period_end=max(line["period"]["end"] for line in lines),
    )
    obj["lines"] = {
        "object": "list",
        "data": list(lines),
        "has_more": False,
        "url": f"/v1/invoices/{invoice_id}/lines",
    }
    obj["parent"] = {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {
            "subscription": subscription_id,
            "metadata": {"account_id": account_id} if account_id else {},
        },
    }
    return obj


def subscription(subscription_id: str, ended_at_s: int) -> Json:
    obj = fixture("subscription")
    obj.update(id=subscription_id, status="canceled", ended_at=ended_at_s, canceled_at=ended_at_s)
    return obj


def charge(charge_id: str, payment_intent: str, amount: int, amount_refunded: int) -> Json:
    obj = fixture("charge")
    obj.update(
        id=charge_id,
        payment_intent=payment_intent,
        amount=amount,
        amount_captured=amount,
        captured=True,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
    )
    return obj


def dispute(dispute_id: str, charge_id: str, payment_intent: str, status: str) -> Json:
    obj = fixture("dispute")
    obj.update(id=dispute_id, charge=charge_id, payment_intent=payment_intent, status=status)
    return obj


# ---- a fake of Stripe's API ------------------------------------------------------------------


@dataclass
class FakeStripe:
    """POST /v1/checkout/sessions and GET /v1/checkout/sessions/{id}/line_items, answering like
    Stripe (the fixtures' shapes); line items come in pages of two, to exercise pagination."""

    api_key: str
    line_items: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    created: list[dict[str, str]] = field(default_factory=list)
    line_item_requests: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    PAGE_SIZE = 2

    def register(self, session_id: str, items: list[tuple[str, int]]) -> None:
        """What the session sold: (price id, quantity) pairs."""
        self.line_items[session_id] = items

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_get("/v1/checkout/sessions/{session}/line_items", self._list_line_items)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _create_session(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _stripe_error(401, "authentication_error", "Invalid API Key provided")
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.created.append(form)
        session_id = new_id("cs")
        self.register(
            session_id, [(form["line_items[0][price]"], int(form["line_items[0][quantity]"]))]
        )
        session = checkout_session(
            session_id,
            form.get("client_reference_id"),
            payment_status="unpaid",
            mode=form["mode"],
            metadata={
                key.removeprefix("metadata[").removesuffix("]"): value
                for key, value in form.items()
                if key.startswith("metadata[")
            },
        )
        session.update(
            status="open",
            success_url=form["success_url"],
            cancel_url=form["cancel_url"],
            url=f"https://checkout.stripe.com/c/pay/{session_id}",
        )
        return web.json_response(session)

    async def _list_line_items(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _stripe_error(401, "authentication_error", "Invalid API Key provided")
        self.line_item_requests += 1
        session_id = request.match_info["session"]
        if session_id not in self.line_items:
            return _stripe_error(
                404, "invalid_request_error", f"No such checkout.session: '{session_id}'"
            )
        items = [
            _line_item(f"li_{session_id}_{index}", price_id, quantity)
            for index, (price_id, quantity) in enumerate(self.line_items[session_id])
        ]
        after = request.query.get("starting_after")
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0)
        page = items[start : start + self.PAGE_SIZE]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "has_more": start + self.PAGE_SIZE < len(items),
                "url": f"/v1/checkout/sessions/{session_id}/line_items",
            }
        )


def _line_item(item_id: str, price_id: str, quantity: int) -> Json:
    price = fixture("price")
    price.update(id=price_id, type="one_time", recurring=None)
    amount = int(price["unit_amount"]) * quantity
    return {
        "id": item_id,
        "object": "item",
        "amount_discount": 0,
        "amount_subtotal": amount,
        "amount_tax": 0,
        "amount_total": amount,
        "currency": "usd",
        "description": "Credits",
        "price": price,
        "quantity": quantity,
    }


def _stripe_error(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": error_type, "message": message}}, status=status)
