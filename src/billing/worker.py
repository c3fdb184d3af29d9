"""The worker: takes due events from the inbox one at a time and processes them.

A transient failure (credits server or Stripe unreachable, an event this one depends on not yet
processed) is retried with exponential backoff; after `attempts_max` tries, or at once for a
permanent failure, the event is parked with its error. The loop itself never dies of a failed
event or an unreachable inbox: it logs, waits a poll interval and goes on.

One worker per inbox database: handlers read what earlier events recorded (a refund reads the
grant and the clawbacks so far), so events are processed one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import time

from billing import limits
from billing.config import WorkerSettings
from billing.errors import Refused, RetryLater
from billing.inbox import Inbox, StoredEvent
from billing.metrics import ListenerMetrics
from billing.processor import Processor
from billing.records import now_us
from billing.stripe_objects import parse_envelope

log = logging.getLogger("credits.listener.worker")


def backoff_seconds(attempts: int, settings: WorkerSettings) -> float:
    """Delay after the `attempts`-th failed try: initial, doubling, capped."""
    assert attempts >= 1, "a delay follows a failed attempt"
    exponent = min(attempts - 1, 62)  # 2**62 seconds is past any cap; avoids float overflow
    return min(settings.backoff_max_seconds, settings.backoff_initial_seconds * 2.0**exponent)


class Worker:
    def __init__(
        self,
        inbox: Inbox,
        processor: Processor,
        settings: WorkerSettings,
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self._inbox = inbox
        self._processor = processor
        self._settings = settings
        self._metrics = metrics or ListenerMetrics()
        self._wake = asyncio.Event()
        self._next_prune_at = time.monotonic()

    def wake(self) -> None:
        """A new event arrived: look now rather than at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before looking, so an event recorded while we look still wakes the idle.
            self._wake.clear()
            try:
                worked = await self.run_once()
                await self._prune_now_and_then()
            except Exception:
                # The inbox database is unreachable, most likely. Nothing is lost: every event
                # stays pending in it.
                log.exception("worker pass failed; retrying after the poll interval")
                worked = False
            if not worked:
                await self._idle(stop)

    async def run_once(self) -> bool:
        """Processes one due event; False when none was due."""
        event = await self._inbox.claim_due()
        if event is None:
            return False
        await self._process(event)
        return True

    async def _process(self, event: StoredEvent) -> None:
        try:
            async with asyncio.timeout(limits.EVENT_PROCESSING_TIMEOUT_SECONDS):
                result = await self._processor.process(parse_envelope(event.payload))
        except Refused as error:
            await self._park(event, str(error))
        except RetryLater as error:
            await self._retry(event, str(error))
        except TimeoutError:
            await self._retry(
                event, f"processing took over {limits.EVENT_PROCESSING_TIMEOUT_SECONDS} s"
            )
        except Exception as error:
            # A bug or an unforeseen failure: retried like a transient one (it may be), and
            # parked after the last attempt with the error for a person to read.
            log.exception("processing failed", extra={"fields": {"event_id": event.event_id}})
            await self._retry(event, f"unexpected {type(error).__name__}: {error}")
        else:
            await self._inbox.finish(event.event_id, result.status, result.outcome)
            self._metrics.event_attempted(event.event_type, result.status, event.received_at_us)
            log.info(
                "event processed",
                extra={
                    "fields": {
                        "event_id": event.event_id,
                        "event_type": event.event_type,
                        "status": result.status,
                        "outcome": result.outcome,
                    }
                },
            )

    async def _retry(self, event: StoredEvent, error: str) -> None:
        if event.attempts >= self._settings.attempts_max:
            await self._park(event, f"gave up after {event.attempts} attempts: {error}")
            return
        delay_seconds = backoff_seconds(event.attempts, self._settings)
        await self._inbox.retry_later(event.event_id, error, delay_seconds)
        self._metrics.event_attempted(event.event_type, "retry", event.received_at_us)
        log.warning(
            "event will be retried",
            extra={
                "fields": {
                    "event_id": event.event_id,
                    "attempts": event.attempts,
                    "delay_seconds": delay_seconds,
                    "error": error,
                }
            },
        )

    async def _park(self, event: StoredEvent, error: str) -> None:
        await self._inbox.park(event.event_id, error)
        self._metrics.event_attempted(event.event_type, "parked", event.received_at_us)
        log.error(
            "event parked",
            extra={
                "fields": {
                    "event_id": event.event_id,
                    "event_type": event.event_type,
                    "error": error,
                }
            },
        )

    async def _idle(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        wake_wait = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                (stop_wait, wake_wait),
                timeout=self._settings.poll_interval_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_wait.cancel()
            wake_wait.cancel()

    async def _prune_now_and_then(self) -> None:
        if time.monotonic() < self._next_prune_at:
            return
        self._next_prune_at = time.monotonic() + limits.PRUNE_INTERVAL_SECONDS
        retention_us = self._settings.retention_days * limits.SECONDS_PER_DAY * 1_000_000
        pruned = await self._inbox.prune(now_us() - retention_us)
        if pruned:
            log.info("pruned processed events", extra={"fields": {"count": pruned}})
