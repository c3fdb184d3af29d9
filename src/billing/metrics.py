"""Prometheus metrics of the Stripe listener, served at GET /metrics on its HTTP port
(docs/operations.md, "Metrics", lists them with the alerts to set).

The inbox gauges are read from the inbox database when scraped: the listener's traffic is a few
events a second at most, and the query touches only pending and parked rows (the status index).
The counters are counted by the worker and the HTTP middleware as things happen. Each listener
has its own registry, so several listeners can run in one process (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy.exc import SQLAlchemyError

from billing import limits
from billing.inbox import Inbox
from billing.records import now_us

log = logging.getLogger("credits.listener.metrics")

# From an event's receipt to its settlement: milliseconds when the credits server answers at
# once, minutes to hours while retries back off through an outage (up to BACKOFF_MAX_SECONDS).
DELIVERY_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0)
# Outcomes of one processing attempt. `retry` is an attempt that failed and will be tried again.
OUTCOMES = ("done", "ignored", "retry", "parked")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ListenerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        r.register(PROCESS_COLLECTOR)
        self._inbox_events = Gauge(
            "credits_listener_inbox_events",
            "Events in the inbox waiting to be processed (status=pending) or parked for an "
            "operator (status=parked)",
            ("status",),
            registry=r,
        )
        self._oldest_pending_age = Gauge(
            "credits_listener_inbox_oldest_pending_age_seconds",
            "Time since the oldest pending event was received (0 when none is pending)",
            registry=r,
        )
        self._inbox_reachable = Gauge(
            "credits_listener_inbox_reachable",
            "1 when the inbox database answered this scrape; 0 and the inbox gauges keep their "
            "last values otherwise",
            registry=r,
        )
        self._processed = Counter(
            "credits_listener_events_processed",
            "Processing attempts by Stripe event type and outcome: done, ignored (a type the "
            "listener does not act on), retry (failed, will be tried again), parked",
            ("event_type", "outcome"),
            registry=r,
        )
        self._delivery = Histogram(
            "credits_listener_event_delivery_seconds",
            "Time from an event's receipt to its settlement (done, ignored or parked); a "
            "replayed event counts from its first receipt",
            ("outcome",),
            buckets=DELIVERY_BUCKETS_SECONDS,
            registry=r,
        )
        self._requests = Counter(
            "credits_listener_http_requests",
            "HTTP requests by route and response status",
            ("route", "status"),
            registry=r,
        )
        for status in ("pending", "parked"):
            self._inbox_events.labels(status)

    def event_attempted(self, event_type: str, outcome: str, received_at_us: int) -> None:
        """Counts one processing attempt; a settled event's delivery time is observed too."""
        assert outcome in OUTCOMES, outcome
        self._processed.labels(event_type, outcome).inc()
        if outcome != "retry":
            delivery_us = max(0, now_us() - received_at_us)
            self._delivery.labels(outcome).observe(delivery_us / limits.MICROSECONDS_PER_SECOND)

    async def refresh_inbox(self, inbox: Inbox) -> None:
        try:
            backlog = await inbox.backlog()
        except (SQLAlchemyError, OSError) as error:
            log.warning("inbox unreachable for metrics", extra={"fields": {"error": str(error)}})
            self._inbox_reachable.set(0)
            return
        self._inbox_reachable.set(1)
        self._inbox_events.labels("pending").set(backlog.pending)
        self._inbox_events.labels("parked").set(backlog.parked)
        self._oldest_pending_age.set(backlog.oldest_pending_age_seconds)

    @web.middleware
    async def count_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The route's template, never the raw path: a scanner's random paths must not become
        # label values.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as error:
            self._requests.labels(route, str(error.status)).inc()
            raise
        self._requests.labels(route, str(response.status)).inc()
        return response

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(metrics: ListenerMetrics, inbox: Inbox) -> Handler:
    async def scrape(request: web.Request) -> web.Response:
        await metrics.refresh_inbox(inbox)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return scrape
