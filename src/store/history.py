"""History: an account's or wallet's journal, newest first, with an opaque cursor.

The cursor is the (created_at_us, credit_type, sequence) of the last entry returned, plus a
digest of the filters, so a token can only continue the listing it came from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from store import codec, limits, rows, validation
from store.errors import FieldViolation, InvalidRequest
from store.model import HistoryPage, HistoryQuery
from store.schema import journal
from store.tx import Transactor

_BIGINT_MAX = 2**63 - 1


def _filters_digest(query: HistoryQuery) -> str:
    filters = codec.dumps(
        [
            query.account_id,
            query.credit_type,
            sorted(k.value for k in query.kinds),
            query.start_us,
            query.end_us,
            query.reservation_id,
            query.action,
        ]
    )
    return hashlib.sha256(filters.encode()).hexdigest()[:16]


def encode_cursor(query: HistoryQuery, created_at_us: int, credit_type: str, sequence: int) -> str:
    raw = codec.dumps(
        {"t": created_at_us, "c": credit_type, "s": sequence, "f": _filters_digest(query)}
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(query: HistoryQuery) -> tuple[int, str, int] | None:
    if not query.page_token:
        return None
    bad = InvalidRequest(
        [
            FieldViolation(
                "page_token", "is not a token History returned for these filters; start without one"
            )
        ]
    )
    try:
        padded = query.page_token + "=" * (-len(query.page_token) % 4)
        cursor = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at_us, credit_type, sequence, digest = (
            cursor["t"],
            cursor["c"],
            cursor["s"],
            cursor["f"],
        )
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    # Only what encode_cursor writes: JSON integers (not floats, Infinity, booleans) and a string.
    integers = all(type(n) is int for n in (created_at_us, sequence))
    if not integers or not isinstance(credit_type, str):
        raise bad
    position = (created_at_us, credit_type, sequence)
    # A forged token must not reach the database with numbers no BIGINT column can hold.
    in_range = all(0 <= n <= _BIGINT_MAX for n in (position[0], position[2]))
    credit_type_ok = limits.CREDIT_TYPE_PATTERN.fullmatch(position[1]) is not None
    if digest != _filters_digest(query) or not in_range or not credit_type_ok:
        raise bad
    return position


async def read_history(tx: Transactor, query: HistoryQuery) -> HistoryPage:
    validation.validate_history(query)
    page_size = query.page_size or limits.HISTORY_PAGE_SIZE_DEFAULT
    after = decode_cursor(query)
    stmt = select(journal).where(journal.c.account_id == query.account_id)
    if query.credit_type:
        stmt = stmt.where(journal.c.credit_type == query.credit_type)
    if query.kinds:
        stmt = stmt.where(journal.c.kind.in_([k.value for k in query.kinds]))
    if query.start_us is not None:
        stmt = stmt.where(journal.c.created_at_us >= query.start_us)
    if query.end_us is not None:
        stmt = stmt.where(journal.c.created_at_us < query.end_us)
    if query.reservation_id:
        stmt = stmt.where(journal.c.reservation_id == query.reservation_id)
    if query.action:
        stmt = stmt.where(journal.c.action == query.action)
    position = tuple_(journal.c.created_at_us, journal.c.credit_type, journal.c.sequence)
    if after is not None:
        stmt = stmt.where(position < tuple_(*after))
    stmt = stmt.order_by(
        journal.c.created_at_us.desc(), journal.c.credit_type.desc(), journal.c.sequence.desc()
    ).limit(page_size + 1)

    async def work(conn: AsyncConnection) -> HistoryPage:
        found = [rows.entry_from_row(r) for r in await conn.execute(stmt)]
        page, more = found[:page_size], len(found) > page_size
        token = ""
        if more:
            last = page[-1]
            token = encode_cursor(query, last.created_at_us, last.credit_type, last.sequence)
        return HistoryPage(tuple(page), token)

    return await tx.read(work)
