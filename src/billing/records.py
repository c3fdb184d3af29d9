"""What the listener remembers of the grants it made, the subscriptions and the disputes.

Each write is an idempotent upsert, so an event processed again after a crash (between its
RPC and its record, or between its record and being marked done) leaves the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import limits
from billing.database import upsert
from billing.rules import GrantPlan
from billing.schema import clawbacks, disputes, grants, periods, subscriptions


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class RecordedGrant:
    idempotency_key: str
    account_id: str
    credit_type: str
    grant_id: str
    amount: int
    kind: str
    stripe_ref: str
    payment_intent: str | None


@dataclass(frozen=True)
class Clawback:
    idempotency_key: str
    grant_key: str
    charge_id: str
    amount_refunded: int
    target_credits: int
    amount_requested: int
    amount_clawed_back: int
    shortfall: int


@dataclass(frozen=True)
class Period:
    period_start_s: int
    period_end_s: int
    level_credits: int


@dataclass(frozen=True)
class Subscription:
    subscription_id: str
    account_id: str | None
    ended_at_s: int | None


@dataclass(frozen=True)
class DisputeRecord:
    dispute_id: str
    account_id: str
    status: str
    closed: bool


class Records:
    def __init__(self, engine: AsyncEngine, clock_us: Callable[[], int] = now_us) -> None:
        self._engine = engine
        self._now_us = clock_us

    # ---- grants -----------------------------------------------------------------------------

    async def grant(self, idempotency_key: str) -> RecordedGrant | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(grants).where(grants.c.idempotency_key == idempotency_key)
                )
            ).first()
        return None if row is None else _grant_from_row(row)

    async def record_grant(self, plan: GrantPlan, grant_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                upsert(conn, grants)
                .values(
                    idempotency_key=plan.idempotency_key,
                    account_id=plan.account_id,
                    credit_type=plan.credit_type,
                    grant_id=grant_id,
                    amount=plan.amount,
                    kind=plan.kind,
                    stripe_ref=plan.stripe_ref,
                    payment_intent=plan.payment_intent,
                    created_at_us=self._now_us(),
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )

    async def grants_for_payment(self, payment_intent: str) -> list[RecordedGrant]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(grants)
                .where(grants.c.payment_intent == payment_intent)
                .order_by(grants.c.idempotency_key)
            )
            return [_grant_from_row(row) for row in rows]

    # ---- clawbacks --------------------------------------------------------------------------

    async def clawback_target(self, grant_key: str) -> int:
        """Credits of the grant that refunds already claimed (clawed back or short)."""
        async with self._engine.connect() as conn:
            target = await conn.scalar(
                select(func.max(clawbacks.c.target_credits)).where(
                    clawbacks.c.grant_key == grant_key
                )
            )
        return int(target or 0)

    async def record_clawback(self, clawback: Clawback) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                upsert(conn, clawbacks)
                .values(
                    idempotency_key=clawback.idempotency_key,
                    grant_key=clawback.grant_key,
                    charge_id=clawback.charge_id,
                    amount_refunded=clawback.amount_refunded,
                    target_credits=clawback.target_credits,
                    amount_requested=clawback.amount_requested,
                    amount_clawed_back=clawback.amount_clawed_back,
                    shortfall=clawback.shortfall,
                    created_at_us=self._now_us(),
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )

    async def clawbacks_of(self, grant_key: str) -> list[Clawback]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(clawbacks)
                .where(clawbacks.c.grant_key == grant_key)
                .order_by(clawbacks.c.target_credits)
            )
            return [
                Clawback(
                    idempotency_key=row.idempotency_key,
                    grant_key=row.grant_key,
                    charge_id=row.charge_id,
                    amount_refunded=row.amount_refunded,
                    target_credits=row.target_credits,
                    amount_requested=row.amount_requested,
                    amount_clawed_back=row.amount_clawed_back,
                    shortfall=row.shortfall,
                )
                for row in rows
            ]

    # ---- subscriptions ----------------------------------------------------------------------

    async def subscription(self, subscription_id: str) -> Subscription | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(subscriptions).where(subscriptions.c.subscription_id == subscription_id)
                )
            ).first()
        if row is None:
            return None
        return Subscription(row.subscription_id, row.account_id, row.ended_at_s)

    async def remember_subscription(
        self, subscription_id: str, account_id: str | None, ended_at_s: int | None = None
    ) -> None:
        """Notes whose subscription it is and, once, when it ended; never forgets either."""
        async with self._engine.begin() as conn:
            statement = upsert(conn, subscriptions).values(
                subscription_id=subscription_id,
                account_id=account_id,
                ended_at_s=ended_at_s,
                updated_at_us=self._now_us(),
            )
            excluded = statement.excluded
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["subscription_id"],
                    set_={
                        "account_id": func.coalesce(
                            subscriptions.c.account_id, excluded.account_id
                        ),
                        "ended_at_s": func.coalesce(
                            subscriptions.c.ended_at_s, excluded.ended_at_s
                        ),
                        "updated_at_us": excluded.updated_at_us,
                    },
                )
            )

    async def period(
        self, subscription_id: str, period_end_s: int, credit_type: str
    ) -> Period | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(periods).where(
                        periods.c.subscription_id == subscription_id,
                        periods.c.period_end_s == period_end_s,
                        periods.c.credit_type == credit_type,
                    )
                )
            ).first()
        return (
            None if row is None else Period(row.period_start_s, row.period_end_s, row.level_credits)
        )

    async def raise_period_level(
        self,
        subscription_id: str,
        credit_type: str,
        period_start_s: int,
        period_end_s: int,
        level_credits: int,
    ) -> None:
        """The period's level becomes at least `level_credits` (never lowered: credits already
        granted for the period stay, and a downgrade waits for the next period)."""
        async with self._engine.begin() as conn:
            statement = upsert(conn, periods).values(
                subscription_id=subscription_id,
                period_end_s=period_end_s,
                credit_type=credit_type,
                period_start_s=period_start_s,
                level_credits=level_credits,
                updated_at_us=self._now_us(),
            )
            excluded = statement.excluded
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["subscription_id", "period_end_s", "credit_type"],
                    set_={
                        "level_credits": func.max(periods.c.level_credits, excluded.level_credits)
                        if conn.dialect.name == "sqlite"
                        else func.greatest(periods.c.level_credits, excluded.level_credits),
                        "updated_at_us": excluded.updated_at_us,
                    },
                )
            )

    # ---- disputes ---------------------------------------------------------------------------

    async def dispute(self, dispute_id: str) -> DisputeRecord | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(disputes).where(disputes.c.dispute_id == dispute_id))
            ).first()
        if row is None:
            return None
        return DisputeRecord(row.dispute_id, row.account_id, row.status, row.closed)

    async def record_dispute(
        self, dispute_id: str, account_id: str, payment_intent: str, status: str, closed: bool
    ) -> None:
        """A dispute, once closed, stays closed whatever order its events arrive in."""
        async with self._engine.begin() as conn:
            statement = upsert(conn, disputes).values(
                dispute_id=dispute_id,
                account_id=account_id,
                payment_intent=payment_intent,
                status=status[:32],
                closed=closed,
                updated_at_us=self._now_us(),
            )
            excluded = statement.excluded
            set_: dict[str, object] = {"updated_at_us": excluded.updated_at_us}
            if closed:
                set_.update(status=excluded.status, closed=True)
            await conn.execute(
                statement.on_conflict_do_update(index_elements=["dispute_id"], set_=set_)
            )

    async def open_disputes(self, account_id: str) -> list[str]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(disputes.c.dispute_id)
                .where(disputes.c.account_id == account_id, disputes.c.closed.is_(False))
                .order_by(disputes.c.dispute_id)
                .limit(limits.PARKED_LIST_MAX)
            )
            return [row.dispute_id for row in rows]


def _grant_from_row(row: Row[Any]) -> RecordedGrant:
    return RecordedGrant(
        idempotency_key=row.idempotency_key,
        account_id=row.account_id,
        credit_type=row.credit_type,
        grant_id=row.grant_id,
        amount=row.amount,
        kind=row.kind,
        stripe_ref=row.stripe_ref,
        payment_intent=row.payment_intent,
    )
