"""The durable inbox: verified events, stored before the webhook says 2xx, processed later.

Statuses: `pending` (waiting for its next attempt, or claimed by a worker), `done` (processed),
`ignored` (a type the listener does not act on; kept so it is counted and deduplicated),
`parked` (failed for good, with its last error, until an operator replays it).

A worker claims an event by moving its `next_attempt_at_us` a lease into the future with a
compare-and-set, so two claimers (a worker and a replay, or two processes) never both take it,
and an event whose worker died becomes due again when the lease runs out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import limits
from billing.database import upsert
from billing.records import now_us
from billing.schema import events
from billing.stripe_objects import Envelope


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    event_type: str
    status: str
    attempts: int
    payload: str
    received_at_us: int
    next_attempt_at_us: int
    processed_at_us: int | None
    last_error: str
    outcome: str


@dataclass(frozen=True)
class Backlog:
    """What waits in the inbox, as of `as_of_us`."""

    as_of_us: int
    pending: int
    parked: int
    oldest_pending_received_at_us: int | None

    @property
    def oldest_pending_age_seconds(self) -> float:
        if self.oldest_pending_received_at_us is None:
            return 0.0
        age_us = max(0, self.as_of_us - self.oldest_pending_received_at_us)
        return age_us / limits.MICROSECONDS_PER_SECOND


class ReplayRefused(Exception):
    """The event cannot be replayed (unknown, or not parked); the message says which."""


class Inbox:
    def __init__(self, engine: AsyncEngine, clock_us: Callable[[], int] = now_us) -> None:
        self._engine = engine
        self._now_us = clock_us

    async def record(self, envelope: Envelope, payload: str) -> bool:
        """Stores a verified event; False when its id was already there (a redelivery)."""
        now = self._now_us()
        async with self._engine.begin() as conn:
            inserted = await conn.execute(
                upsert(conn, events)
                .values(
                    event_id=envelope.event_id,
                    event_type=envelope.event_type,
                    livemode=envelope.livemode,
                    stripe_created_s=envelope.created_s,
                    payload=payload,
                    status="pending",
                    attempts=0,
                    next_attempt_at_us=now,
                    received_at_us=now,
                    processed_at_us=None,
                    last_error="",
                    outcome="",
                )
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(events.c.event_id)
            )
            return inserted.first() is not None

    async def claim_due(self) -> StoredEvent | None:
        """The oldest due pending event, now leased to the caller with its attempt counted."""
        now = self._now_us()
        for _ in range(limits.CLAIM_TRIES_MAX):
            async with self._engine.begin() as conn:
                candidate = (
                    await conn.execute(
                        select(events.c.event_id, events.c.next_attempt_at_us)
                        .where(events.c.status == "pending", events.c.next_attempt_at_us <= now)
                        .order_by(events.c.next_attempt_at_us, events.c.stripe_created_s)
                        .limit(1)
                    )
                ).first()
                if candidate is None:
                    return None
                lease_until_us = now + int(
                    limits.CLAIM_LEASE_SECONDS * limits.MICROSECONDS_PER_SECOND
                )
                claimed = await conn.execute(
                    update(events)
                    .where(
                        events.c.event_id == candidate.event_id,
                        events.c.status == "pending",
                        events.c.next_attempt_at_us == candidate.next_attempt_at_us,
                    )
                    .values(attempts=events.c.attempts + 1, next_attempt_at_us=lease_until_us)
                )
                if claimed.rowcount == 1:
                    row = (
                        await conn.execute(
                            select(events).where(events.c.event_id == candidate.event_id)
                        )
                    ).one()
                    return _stored(row)
            # Another claimer won this one; look again.
        return None

    async def finish(self, event_id: str, status: str, outcome: str) -> None:
        assert status in ("done", "ignored"), status
        await self._settle(
            event_id,
            status=status,
            outcome=outcome[: limits.EVENT_OUTCOME_LENGTH_MAX],
            last_error="",
            processed_at_us=self._now_us(),
        )

    async def retry_later(self, event_id: str, error: str, delay_seconds: float) -> None:
        await self._settle(
            event_id,
            status="pending",
            last_error=error[: limits.EVENT_ERROR_LENGTH_MAX],
            next_attempt_at_us=self._now_us() + int(delay_seconds * limits.MICROSECONDS_PER_SECOND),
        )

    async def park(self, event_id: str, error: str) -> None:
        await self._settle(
            event_id,
            status="parked",
            last_error=error[: limits.EVENT_ERROR_LENGTH_MAX],
            processed_at_us=self._now_us(),
        )

    async def _settle(self, event_id: str, **values: Any) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(events)
                .where(events.c.event_id == event_id, events.c.status == "pending")
                .values(**values)
            )
        assert result.rowcount == 1, f"event {event_id} was not pending when settled"

    async def replay(self, event_id: str) -> StoredEvent:
        """Puts a parked event back in line, with a fresh set of attempts, due now."""
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(events).where(events.c.event_id == event_id))).first()
            if row is None:
                raise ReplayRefused(f"no event {event_id} in the inbox")
            if row.status != "parked":
                raise ReplayRefused(
                    f"event {event_id} is {row.status}, not parked: only parked events are replayed"
                )
            await conn.execute(
                update(events)
                .where(events.c.event_id == event_id, events.c.status == "parked")
                .values(status="pending", attempts=0, next_attempt_at_us=self._now_us())
            )
            return _stored(
                (await conn.execute(select(events).where(events.c.event_id == event_id))).one()
            )

    async def get(self, event_id: str) -> StoredEvent | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(events).where(events.c.event_id == event_id))).first()
        return None if row is None else _stored(row)

    async def parked(self, limit: int = limits.PARKED_LIST_MAX) -> list[StoredEvent]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(events)
                .where(events.c.status == "parked")
                .order_by(events.c.received_at_us)
                .limit(min(limit, limits.PARKED_LIST_MAX))
            )
            return [_stored(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """Events per status (every status present, zero when none)."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.status, func.count()).group_by(events.c.status)
            )
            found = {str(status): int(count) for status, count in rows}
        return {status: found.get(status, 0) for status in ("pending", "done", "ignored", "parked")}

    async def backlog(self) -> Backlog:
        """Pending and parked events only: the status index finds them without reading the
        done and ignored events kept for deduplication."""
        now = self._now_us()
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.status, func.count(), func.min(events.c.received_at_us))
                .where(events.c.status.in_(("pending", "parked")))
                .group_by(events.c.status)
            )
            found = {str(status): (int(count), oldest) for status, count, oldest in rows}
        pending, oldest_pending = found.get("pending", (0, None))
        return Backlog(
            as_of_us=now,
            pending=pending,
            parked=found.get("parked", (0, None))[0],
            oldest_pending_received_at_us=None if oldest_pending is None else int(oldest_pending),
        )

    async def ignored_by_type(self) -> dict[str, int]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.event_type, func.count())
                .where(events.c.status == "ignored")
                .group_by(events.c.event_type)
                .order_by(events.c.event_type)
            )
            return {str(event_type): int(count) for event_type, count in rows}

    async def prune(self, older_than_us: int) -> int:
        """Forgets up to PRUNE_BATCH_MAX done or ignored events processed before older_than_us.
        Parked and pending events are never pruned."""
        async with self._engine.begin() as conn:
            doomed = [
                row.event_id
                for row in await conn.execute(
                    select(events.c.event_id)
                    .where(
                        events.c.status.in_(("done", "ignored")),
                        events.c.processed_at_us < older_than_us,
                    )
                    .limit(limits.PRUNE_BATCH_MAX)
                )
            ]
            if doomed:
                await conn.execute(delete(events).where(events.c.event_id.in_(doomed)))
        return len(doomed)

    async def ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.scalar(select(1))


def _stored(row: Row[Any]) -> StoredEvent:
    return StoredEvent(
        event_id=row.event_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        payload=row.payload,
        received_at_us=row.received_at_us,
        next_attempt_at_us=row.next_attempt_at_us,
        processed_at_us=row.processed_at_us,
        last_error=row.last_error,
        outcome=row.outcome,
    )
