"""The listener's HTTP surface (aiohttp): the Stripe webhook, a health check, the purchase flow.

POST /stripe/webhook  verify, store in the inbox, answer 200; or 4xx with the reason and
                      nothing stored. 503 when the inbox cannot store it (Stripe retries).
GET  /healthz         200 with the inbox's counts when its database answers, else 503.
GET  /metrics         Prometheus metrics (billing/metrics.py).
POST /purchases       {"account_id", "price_id", "quantity"?, "idempotency_key"?} -> 201
                      {"session_id", "url"}: a Stripe Checkout Session to send the buyer to.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import stripe
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from billing import limits, purchases, signatures
from billing.config import ListenerConfig
from billing.errors import Refused
from billing.inbox import Inbox
from billing.metrics import ListenerMetrics, metrics_handler
from billing.stripe_api import StripeApi
from billing.stripe_objects import parse_envelope

log = logging.getLogger("credits.listener.http")

WEBHOOK_PATH = "/stripe/webhook"


def build(
    config: ListenerConfig,
    inbox: Inbox,
    wake_worker: Callable[[], None],
    stripe_api: StripeApi | None,
    metrics: ListenerMetrics,
) -> web.Application:
    # aiohttp refuses bodies over client_max_size while reading them (413), so an oversized body
    # is never held in memory whole.
    app = web.Application(
        client_max_size=limits.WEBHOOK_BODY_BYTES_MAX, middlewares=[metrics.count_requests]
    )
    routes = _Routes(config, inbox, wake_worker, stripe_api)
    app.router.add_post(WEBHOOK_PATH, routes.webhook)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_post("/purchases", routes.purchase)
    app.router.add_get("/metrics", metrics_handler(metrics, inbox))
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _Routes:
    def __init__(
        self,
        config: ListenerConfig,
        inbox: Inbox,
        wake_worker: Callable[[], None],
        stripe_api: StripeApi | None,
    ) -> None:
        self._config = config
        self._inbox = inbox
        self._wake_worker = wake_worker
        self._stripe_api = stripe_api

    async def webhook(self, request: web.Request) -> web.Response:
        body = await _read_body(request, limits.WEBHOOK_BODY_BYTES_MAX)
        if isinstance(body, web.Response):
            return body
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            return _refused(400, "the body is not UTF-8 text")
        try:
            signatures.verify(
                payload, request.headers.get("Stripe-Signature"), self._config.signing_secrets
            )
        except signatures.SignatureRejected as error:
            return _refused(400, str(error))
        try:
            envelope = parse_envelope(payload)
        except Refused as error:
            return _refused(400, f"not a Stripe event: {error}")
        if envelope.livemode != self._config.livemode:
            mode = "live" if envelope.livemode else "test"
            ours = "live" if self._config.livemode else "test"
            return _refused(
                400,
                f"{envelope.event_id} is a {mode}-mode event and this listener runs in {ours} "
                "mode: refused, nothing recorded",
            )
        try:
            new = await self._inbox.record(envelope, payload)
        except (SQLAlchemyError, OSError) as error:
            log.exception("inbox unavailable", extra={"fields": {"event_id": envelope.event_id}})
            return _error(
                503, f"the inbox cannot store the event right now ({type(error).__name__})"
            )
        if new:
            self._wake_worker()
        log.info(
            "event received",
            extra={
                "fields": {
                    "event_id": envelope.event_id,
                    "event_type": envelope.event_type,
                    "duplicate": not new,
                }
            },
        )
        return web.json_response(
            {"received": True, "event_id": envelope.event_id, "duplicate": not new}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            counts = await self._inbox.counts()
        except (SQLAlchemyError, OSError) as error:
            return _error(503, f"the inbox database is unreachable ({type(error).__name__})")
        return web.json_response({"status": "ok", "livemode": self._config.livemode, **counts})

    async def purchase(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "a valid 'Authorization: Bearer <token>' header is required")
        if self._stripe_api is None:
            return _error(503, "no STRIPE_API_KEY configured: purchases are off")
        body = await _read_body(request, limits.PURCHASE_BODY_BYTES_MAX)
        if isinstance(body, web.Response):
            return body
        try:
            asked = purchases.parse(body, self._config.packs)
        except purchases.PurchaseInvalid as error:
            return _error(400, str(error))
        try:
            started = await self._stripe_api.create_checkout_session(
                account_id=asked.account_id,
                price_id=asked.pack.price_id,
                quantity=asked.quantity,
                success_url=self._config.checkout.success_url,
                cancel_url=self._config.checkout.cancel_url,
                idempotency_key=asked.idempotency_key,
            )
        except stripe.StripeError as error:
            log.warning("checkout session refused", extra={"fields": {"error": str(error)}})
            return _error(502, f"Stripe did not create the checkout session: {error}")
        return web.json_response({"session_id": started.session_id, "url": started.url}, status=201)

    def _authorised(self, request: web.Request) -> bool:
        token = self._config.purchase_token
        if not token:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def _read_body(request: web.Request, bytes_max: int) -> bytes | web.Response:
    # Content-Length first, so a client announcing a huge body is answered before it sends it.
    if request.content_length is not None and request.content_length > bytes_max:
        return _refused(413, f"the body is {request.content_length} bytes; at most {bytes_max}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _refused(413, f"the body is larger than {bytes_max} bytes")
    if len(body) > bytes_max:
        return _refused(413, f"the body is {len(body)} bytes; at most {bytes_max}")
    return body


def _refused(status: int, message: str) -> web.Response:
    log.warning("delivery refused", extra={"fields": {"status": status, "reason": message}})
    return _error(status, message)
