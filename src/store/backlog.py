"""How much unfinished work the database holds: pending holds, and expiries not yet swept.

Read every few seconds for the metrics, on every replica, so each statement must stay cheap
whatever the size of the ledger:

- the count of pending reservations scans only the partial index of pending holds
  (`ix_reservations_pending_expiry`), and stops at `BACKLOG_PENDING_SCAN_MAX` rows;
- the oldest overdue hold is the first entry of the hold sweeper's partial index
  (`ix_reservations_pending_expiry`): one index probe;
- the oldest overdue grant is the first entry with credits left of the grant sweeper's
  (`ix_grants_expiring`), which also holds, until the sweeper settles them, grants spent out or
  waiting for their holds: a few entries to step over while the sweeper keeps up.

The statements are written out with literal predicates (`status = 'pending'`,
`NOT expiry_settled`) on purpose: Postgres uses a partial index only when the query's WHERE
clause implies the index's, and a bound parameter in place of the literal would not, once the
plan is generic.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from store import limits
from store.schema import GRANTS_EXPIRING_WHERE_POSTGRES, GRANTS_EXPIRING_WHERE_SQLITE
from store.tx import Transactor

_PENDING_HOLDS = text(
    "SELECT count(*), min(created_at_us) FROM ("
    " SELECT created_at_us FROM reservations WHERE status = 'pending' LIMIT :scan_max"
    ") AS pending"
)
_OLDEST_OVERDUE_HOLD = text(
    "SELECT min(expires_at_us) FROM reservations"
    " WHERE status = 'pending' AND expires_at_us <= :now_us"
)
# Per dialect: each repeats the index's predicate as that dialect writes it (store/schema.py).
# The index also holds the sweeper's other unsettled grants (spent out, or waiting for their
# holds), which the scan steps over: with the sweeper running, few.
_OLDEST_OVERDUE_GRANT = {
    dialect: text(
        f"SELECT min(expires_at_us) FROM grants WHERE {where}"
        " AND expires_at_us <= :now_us AND remaining > 0"
    )
    for dialect, where in (
        ("postgresql", GRANTS_EXPIRING_WHERE_POSTGRES),
        ("sqlite", GRANTS_EXPIRING_WHERE_SQLITE),
    )
}


@dataclass(frozen=True)
class Backlog:
    """What is waiting, as of `as_of_us` (the ledger clock's reading the queries used)."""

    as_of_us: int
    # At most BACKLOG_PENDING_SCAN_MAX: beyond it the count saturates (and so may the oldest).
    reservations_pending: int
    oldest_pending_created_at_us: int | None
    # Pending holds past their TTL and grants past expires_at with credits left: what the
    # sweepers have yet to journal. None when there is none.
    oldest_overdue_hold_expires_at_us: int | None
    oldest_overdue_grant_expires_at_us: int | None

    def __post_init__(self) -> None:
        assert 0 <= self.reservations_pending <= limits.BACKLOG_PENDING_SCAN_MAX
        assert (self.oldest_pending_created_at_us is None) == (self.reservations_pending == 0)
        for overdue_at_us in (
            self.oldest_overdue_hold_expires_at_us,
            self.oldest_overdue_grant_expires_at_us,
        ):
            assert overdue_at_us is None or overdue_at_us <= self.as_of_us, "overdue is past"

    @property
    def oldest_pending_age_seconds(self) -> float:
        if self.oldest_pending_created_at_us is None:
            return 0.0
        return _seconds_between(self.oldest_pending_created_at_us, self.as_of_us)

    @property
    def hold_sweep_lag_seconds(self) -> float:
        """How long the most overdue pending hold has been past its TTL; 0 when none is."""
        if self.oldest_overdue_hold_expires_at_us is None:
            return 0.0
        return _seconds_between(self.oldest_overdue_hold_expires_at_us, self.as_of_us)

    @property
    def grant_sweep_lag_seconds(self) -> float:
        """How long the most overdue grant has had unexpired credits left; 0 when none has."""
        if self.oldest_overdue_grant_expires_at_us is None:
            return 0.0
        return _seconds_between(self.oldest_overdue_grant_expires_at_us, self.as_of_us)


def _seconds_between(earlier_us: int, later_us: int) -> float:
    # A row written by a replica whose clock runs ahead can look created in the future.
    return max(0, later_us - earlier_us) / limits.MICROSECONDS_PER_SECOND


async def read_backlog(transactor: Transactor, now_us: int) -> Backlog:
    """Three small reads on one connection, outside a transaction: each number is a gauge, and a
    moment's skew between them is harmless."""

    async def work(conn: AsyncConnection) -> Backlog:
        pending = (
            await conn.execute(_PENDING_HOLDS, {"scan_max": limits.BACKLOG_PENDING_SCAN_MAX})
        ).one()
        hold_expires_at_us = await conn.scalar(_OLDEST_OVERDUE_HOLD, {"now_us": now_us})
        grant_expires_at_us = await conn.scalar(
            _OLDEST_OVERDUE_GRANT[conn.dialect.name], {"now_us": now_us}
        )
        return Backlog(
            as_of_us=now_us,
            reservations_pending=int(pending[0]),
            oldest_pending_created_at_us=None if pending[1] is None else int(pending[1]),
            oldest_overdue_hold_expires_at_us=(
                None if hold_expires_at_us is None else int(hold_expires_at_us)
            ),
            oldest_overdue_grant_expires_at_us=(
                None if grant_expires_at_us is None else int(grant_expires_at_us)
            ),
        )

    return await transactor.read(work)
