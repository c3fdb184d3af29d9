"""Idempotency keys: the first completed outcome of a key is final (DESIGN.md invariant 4).

The claim is an INSERT ... ON CONFLICT DO NOTHING in the same transaction as the effect. On
Postgres a concurrent request with the same key blocks on the unique index until the first
transaction ends: if it committed, the second finds the stored outcome; if it rolled back
(transient failure), the second claims the key itself. So 50 concurrent identical requests make
one effect, and a failed attempt leaves the key free for a retry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from store import codec
from store.errors import IdempotencyKeyReused
from store.rows import upsert
from store.schema import idempotency_keys

RequestFields = Mapping[str, object]


def request_json(operation: str, request: RequestFields) -> str:
    """The canonical form of a request stored with its key (compared field by field on reuse)."""
    return codec.dumps({"operation": operation, **request})


async def claim(
    conn: AsyncConnection,
    account_id: str,
    key: str,
    operation: str,
    request: RequestFields,
    now_us: int,
) -> codec.Outcome | None:
    """Claims the key for this request (None), or returns the outcome stored under it."""
    asked_json = request_json(operation, request)
    inserted = await conn.execute(
        upsert(conn, idempotency_keys)
        .values(
            account_id=account_id,
            idempotency_key=key,
            operation=operation,
            request_json=asked_json,
            outcome_json="",
            created_at_us=now_us,
        )
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(idempotency_keys.c.account_id)
    )
    if inserted.first() is not None:
        return None
    row = (
        await conn.execute(
            select(idempotency_keys.c.request_json, idempotency_keys.c.outcome_json).where(
                idempotency_keys.c.account_id == account_id,
                idempotency_keys.c.idempotency_key == key,
            )
        )
    ).one()
    differing = first_differing_field(json.loads(row.request_json), json.loads(asked_json))
    if differing is not None:
        raise IdempotencyKeyReused(key, differing)
    assert row.outcome_json, f"key {key!r} of {account_id!r} was committed without an outcome"
    return codec.outcome_from_json(row.outcome_json)


def first_differing_field(stored: dict[str, object], asked: dict[str, object]) -> str | None:
    for field in sorted(set(stored) | set(asked), key=lambda f: (f != "operation", f)):
        if stored.get(field) != asked.get(field):
            return field
    return None


async def record(conn: AsyncConnection, account_id: str, key: str, outcome: codec.Outcome) -> None:
    result = await conn.execute(
        update(idempotency_keys)
        .where(
            idempotency_keys.c.account_id == account_id,
            idempotency_keys.c.idempotency_key == key,
        )
        .values(outcome_json=codec.outcome_to_json(outcome))
    )
    assert result.rowcount == 1, "the outcome is recorded under the key this transaction claimed"


async def prune(conn: AsyncConnection, older_than_us: int, batch_max: int) -> int:
    """Deletes up to batch_max keys created before older_than_us; returns how many."""
    doomed = (
        select(idempotency_keys.c.account_id, idempotency_keys.c.idempotency_key)
        .where(idempotency_keys.c.created_at_us < older_than_us)
        .limit(batch_max)
    )
    rows = (await conn.execute(doomed)).all()
    for row in rows:
        await conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.account_id == row.account_id,
                idempotency_keys.c.idempotency_key == row.idempotency_key,
            )
        )
    return len(rows)
