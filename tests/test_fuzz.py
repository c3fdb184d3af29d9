"""Hostile requests to every RPC of credits.v1.CreditsService, on SQLite and Postgres.

Hypothesis builds typed requests whose fields are hostile (strings over every limit, NUL, RTL
and zero-width marks, odd code points, int64 and int32 extremes, unknown enum values, timestamps
outside their range, forged page tokens, ids of other accounts' reservations and grants) and
raw payloads (random bytes, hand-made protobuf fields of every wire type) sent through a generic
bytes-in, bytes-out call. Every answer must be one a caller can act on: OK, INVALID_ARGUMENT
with field violations, NOT_FOUND, FAILED_PRECONDITION with a reason, or ALREADY_EXISTS for an
idempotency key that was really used before. Never INTERNAL or UNKNOWN, never a transport error.
And a refused request changes nothing: every ledger row of the test's accounts and the row
count of every ledger table are compared before and after each call (after read-only calls too).

test_limits.py proves each limit at its edge and throws raw bytes at the six public methods
checking status codes only; this file adds the admin RPCs, typed hostile fields, and the
"nothing changes" check per call. It reuses test_limits' wire-format helpers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from rich_errors import error_reason, field_violations
from sqlalchemy import Table, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from test_limits import string_field, varint

from credits.v1 import credits_pb2 as pb
from store import limits
from store.database import create_engine
from store.history import encode_cursor
from store.model import HistoryQuery
from store.schema import (
    account_status_changes,
    grants,
    idempotency_keys,
    journal,
    reservation_slices,
    reservations,
    wallets,
)
from store.schema import accounts as accounts_table

SERVICE_PATH = "/credits.v1.CreditsService/"
SERVICE = pb.DESCRIPTOR.services_by_name["CreditsService"]
METHODS = tuple(m.name for m in SERVICE.methods)
REQUEST_CLASSES: dict[str, type[Message]] = {
    m.name: getattr(pb, m.input_type.name) for m in SERVICE.methods
}
READ_ONLY = frozenset({"CheckCredits", "History"})
LEDGER_TABLES: tuple[Table, ...] = (
    accounts_table,
    wallets,
    grants,
    reservations,
    reservation_slices,
    journal,
    idempotency_keys,
    account_status_changes,
)
ANSWERS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# Outcomes stored under an idempotency key (DESIGN.md invariant 4): after one of these, the same
# key with another request is ALREADY_EXISTS.
KEY_STORING = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}
)
CALL_TIMEOUT_SECONDS = 10.0
# Per database; keeps each run well under 30 s on a shared two-core machine.
EXAMPLES_MAX = 300
# How many text fields (and metadata entries) of one request are hostile at once: all of them.
# Error statuses are bounded in size, so even these get INVALID_ARGUMENT (see the tests at the
# end), not a trailer a client must drop.
HOSTILE_TEXT_FIELDS_MAX = 8
HOSTILE_METADATA_ENTRIES_MAX = limits.METADATA_ENTRIES_MAX + 2
KINDS_SENT = 300

# ---- values --------------------------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ODD_TEXT = (
    "",
    " ",
    "\x00",
    "user\x00",
    "\x00" * 40,
    "\u202eevil",  # right-to-left override
    "\u200b",  # zero-width space
    "a\u200db",  # zero-width joiner
    "\ufeffbom",
    "\u2028",  # line separator
    "\ufffe",  # a noncharacter, still valid UTF-8
    "\U0010ffff",
    "\U000e0001",  # a tag character
    "\U0001f4a9",
    "e\u0301",  # combining accent
    "مرحبا",
    "שלום",
    "ǅ",
    "\x7f",
    "\x85",
    "\t",
    "\r\n",
    "%s%n%x",
    "'; DROP TABLE journal; --",
    "../../etc/passwd",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "null",
    "NaN",
    "-0",
    "1e999",
    "\\",
    '"',
    "user:42",  # valid, but another account space
)
hostile_text = st.one_of(
    st.sampled_from(ODD_TEXT),
    # Any code point UTF-8 can carry (surrogates cannot be sent at all).
    st.text(st.characters(codec="utf-8"), max_size=60),
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["a", "9", "é", "\u200b", "\U0001f4a9", "\x00", "k"]),
        st.sampled_from([33, 65, 129, 256, 257, 513, 2000, 5000]),
    ),
)
int64s = st.one_of(
    st.sampled_from(
        [
            *(0, 1, -1, limits.AMOUNT_MAX, limits.AMOUNT_MAX + 1, limits.WALLET_BALANCE_MAX),
            *(INT32_MAX + 1, 2**53 + 1, INT64_MIN, INT64_MAX),
        ]
    ),
    st.integers(INT64_MIN, INT64_MAX),
)
int32s = st.one_of(
    st.sampled_from([0, 1, -1, 500, 501, 1000, 1001, 3600, 3601, 86_400, INT32_MIN, INT32_MAX]),
    st.integers(INT32_MIN, INT32_MAX),
)
enums = st.one_of(st.integers(-2, 9), st.integers(INT32_MIN, INT32_MAX))
timestamps = st.one_of(
    st.none(),
    st.builds(
        Timestamp,
        seconds=st.one_of(
            st.integers(1_700_000_000, 2_200_000_000),
            st.integers(INT64_MIN, INT64_MAX),
            st.sampled_from([-62_135_596_801, -62_135_596_800, 253_402_300_799, 253_402_300_800]),
        ),
        nanos=st.one_of(st.just(0), st.integers(-1, 10**9), st.integers(INT32_MIN, INT32_MAX)),
    ),
)


metadata_maps = st.one_of(
    st.dictionaries(
        st.sampled_from(["k", "key.a", "x-1"]), st.sampled_from(["", "v", "é" * 256]), max_size=3
    ),
    # Hostile entries, a few at a time.
    st.dictionaries(
        st.one_of(hostile_text, st.sampled_from(["k", "z"])),
        st.one_of(hostile_text, st.just("v")),
        min_size=1,
        max_size=HOSTILE_METADATA_ENTRIES_MAX,
    ),
    # More entries than allowed: refused as a whole, in one violation.
    st.integers(limits.METADATA_ENTRIES_MAX + 1, 40).map(
        lambda n: {f"k{i}": "v" for i in range(n)}
    ),
)


# ---- the accounts the requests aim at ------------------------------------------------------------


@dataclass
class Targets:
    """The test's accounts, in every state a request can meet, and ids that exist."""

    prefix: str
    main: str
    locked: str
    reservation_ids: list[str] = field(default_factory=list)
    grant_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    # (account, key) pairs whose first outcome is stored.
    used_keys: set[tuple[str, str]] = field(default_factory=set)

    def valid_account_id(self, value: str) -> bool:
        return (
            len(value) <= limits.ACCOUNT_ID_LENGTH_MAX
            and limits.ACCOUNT_ID_PATTERN.fullmatch(value) is not None
        )


def account_ids(t: Targets) -> st.SearchStrategy[str]:
    # Whatever is a valid account id lands under the test's prefix, so an accepted request only
    # ever touches the test's own accounts.
    return st.one_of(
        st.sampled_from([t.main, t.locked, t.prefix + "fresh"]),
        hostile_text.map(lambda text: t.prefix + text),
        hostile_text.filter(lambda text: not t.valid_account_id(text)),
    )


def forged_page_tokens(t: Targets) -> st.SearchStrategy[str]:
    position = st.integers(-(2**70), 2**70)
    return st.builds(
        lambda at, credit_type, sequence: encode_cursor(
            HistoryQuery(account_id=t.main), at, credit_type, sequence
        ),
        st.one_of(position, st.integers(0, INT64_MAX)),
        st.one_of(st.just("default"), hostile_text),
        st.one_of(position, st.integers(0, INT64_MAX)),
    )


def benign_text(t: Targets) -> dict[str, st.SearchStrategy[str]]:
    keys = st.one_of(
        st.uuids().map(lambda u: f"fz-{u.hex}"),
        st.sampled_from(["fund", "pending", "committed", "spent-twice"]),
    )
    return {
        "account_id": st.sampled_from([t.main, t.locked, t.prefix + "fresh"]),
        "credit_type": st.sampled_from(["", "default", "ai"]),
        "idempotency_key": keys,
        "action": st.sampled_from(["", "fuzz.lookup"]),
        "request_id": st.sampled_from(["", "req-1"]),
        "external_ref": st.sampled_from(["", "pi_123"]),
        "reservation_id": st.sampled_from([*t.reservation_ids, "rsv_missing"]),
        "grant_id": st.sampled_from([*t.grant_ids, "grt_missing"]),
        "page_token": st.one_of(st.just(""), st.sampled_from(t.page_tokens)),
        "reason": st.sampled_from(["", "fraud review"]),
    }


def hostile_text_for(t: Targets, name: str) -> st.SearchStrategy[str]:
    if name == "account_id":
        return account_ids(t)
    if name == "page_token":
        return st.one_of(hostile_text, forged_page_tokens(t))
    return hostile_text


TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "CheckCredits": ("account_id", "credit_type"),
    "Reserve": ("account_id", "credit_type", "idempotency_key", "action", "request_id"),
    "Commit": ("account_id", "reservation_id"),
    "Release": ("account_id", "reservation_id"),
    "AddCredits": (
        "account_id",
        "credit_type",
        "idempotency_key",
        "external_ref",
        "action",
        "request_id",
    ),
    "History": ("account_id", "credit_type", "reservation_id", "action", "page_token"),
    "SetAccountStatus": ("account_id", "reason"),
    "ClawBack": ("account_id", "grant_id", "idempotency_key", "action", "request_id"),
}
# Each other field: (a value that passes validation, a hostile one). Each request takes the
# hostile one for a random subset, so some requests get past validation to the ledger.
absent = st.none()
OTHER_FIELDS: dict[str, dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]] = {
    "CheckCredits": {
        "amount": (st.integers(0, 100), int64s),
        "consistent": (st.booleans(), st.booleans()),
    },
    "Reserve": {
        "amount": (st.integers(1, 100), int64s),
        "ttl_seconds": (st.sampled_from([0, 60, 3600]), int32s),
        "metadata": (st.just({}), metadata_maps),
    },
    "Commit": {"amount": (st.one_of(absent, st.integers(0, 50)), st.one_of(absent, int64s))},
    "Release": {},
    "AddCredits": {
        "amount": (st.integers(1, 100), int64s),
        "source": (st.integers(1, 8), enums),
        "priority": (st.one_of(absent, st.integers(0, 1000)), st.one_of(absent, int32s)),
        "effective_at": (absent, timestamps),
        "expires_at": (absent, timestamps),
        "metadata": (st.just({}), metadata_maps),
    },
    "History": {
        "kinds": (st.lists(st.integers(1, 7), max_size=3), st.lists(enums, max_size=KINDS_SENT)),
        "start_time": (absent, timestamps),
        "end_time": (absent, timestamps),
        "page_size": (st.integers(0, 20), int32s),
    },
    "SetAccountStatus": {"status": (st.integers(1, 2), enums)},
    "ClawBack": {"amount": (st.integers(1, 10), int64s)},
}
assert set(TEXT_FIELDS) == set(OTHER_FIELDS) == set(METHODS), "every RPC is fuzzed"


@st.composite
def typed_requests(draw: st.DrawFn, t: Targets, method: str) -> Message:
    names = TEXT_FIELDS[method]
    hostile = set(
        draw(st.lists(st.sampled_from(names), max_size=HOSTILE_TEXT_FIELDS_MAX, unique=True))
    )
    benign = benign_text(t)
    fields: dict[str, Any] = {
        name: draw(hostile_text_for(t, name) if name in hostile else benign[name]) for name in names
    }
    for name, (valid, odd) in OTHER_FIELDS[method].items():
        value = draw(st.one_of(valid, odd))
        if value is not None:  # None: the optional field is absent
            fields[name] = value
    request = REQUEST_CLASSES[method](**fields)
    # Larger requests are refused by the transport (RESOURCE_EXHAUSTED), proved in test_limits.
    assume(request.ByteSize() < limits.REQUEST_BYTES_MAX - 1024)
    return request


_wire_fields = st.one_of(
    st.builds(  # varint, up to uint64 max
        lambda n, v: varint(n << 3) + varint(v),
        st.integers(1, 20),
        st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    ),
    st.builds(  # length-delimited: text, bytes, or a nested message of fields
        string_field,
        st.integers(1, 20),
        st.one_of(
            st.binary(max_size=64),
            st.text(st.characters(codec="utf-8"), max_size=40).map(str.encode),
            st.lists(
                st.builds(string_field, st.integers(1, 3), st.binary(max_size=8)), max_size=3
            ).map(b"".join),
        ),
    ),
    st.builds(  # fixed64, fixed32
        lambda n, wire, b: varint(n << 3 | wire) + b,
        st.integers(1, 20),
        st.sampled_from([1, 5]),
        st.binary(min_size=8, max_size=8),
    ),
    st.builds(  # groups (3, 4) and the undefined wire types (6, 7)
        lambda n, wire: varint(n << 3 | wire), st.integers(1, 20), st.sampled_from([3, 4, 6, 7])
    ),
)


def raw_payloads(t: Targets) -> st.SearchStrategy[bytes]:
    own_account = string_field(1, t.main.encode())
    return st.one_of(
        st.binary(max_size=512),
        # Field 1 is account_id in every request, and in proto3 the last one wins: whatever
        # parses aims at the test's own account.
        st.lists(_wire_fields, max_size=8).map(lambda fs: b"".join(fs) + own_account),
    )


@dataclass(frozen=True)
class Attempt:
    method: str
    request: Message | bytes


def attempts(t: Targets) -> st.SearchStrategy[Attempt]:
    return st.sampled_from(METHODS).flatmap(
        lambda method: st.one_of(
            typed_requests(t, method), typed_requests(t, method), raw_payloads(t)
        ).map(lambda request: Attempt(method, request))
    )


# ---- what a call may change ----------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    violations: list[tuple[str, str]]
    reason: str  # ErrorInfo.reason, when the status carries one


LedgerState = dict[str, tuple[int, list[tuple[Any, ...]]]]


async def ledger_state(engine: AsyncEngine, prefix: str, account_id: str) -> LedgerState:
    """Per ledger table: its row count, and every row of the test's accounts and of the account
    the request named."""
    async with engine.connect() as conn:
        counts = (
            await conn.execute(
                select(
                    *(select(func.count()).select_from(t).scalar_subquery() for t in LEDGER_TABLES)
                )
            )
        ).one()
        state: LedgerState = {}
        for table, count in zip(LEDGER_TABLES, counts, strict=True):
            mine = table.c.account_id.startswith(prefix, autoescape=True)
            # Postgres cannot even compare a text with NUL in it; no such id can be stored.
            if account_id and "\x00" not in account_id:
                mine = or_(mine, table.c.account_id == account_id)
            found = await conn.execute(
                select(table).where(mine).order_by(*table.primary_key.columns)
            )
            state[table.name] = (int(count), [tuple(r) for r in found])
    return state


def assert_unchanged(
    before: LedgerState, after: LedgerState, outcome: Outcome, account_id: str, key: str
) -> None:
    """Nothing changed, except that a business failure (FAILED_PRECONDITION under a new key) is
    stored as the key's outcome: one more idempotency_keys row, that key's."""
    changed = {name for name in before if before[name] != after[name]}
    if outcome.code is grpc.StatusCode.FAILED_PRECONDITION and key:
        changed.discard(idempotency_keys.name)
        count_before, rows_before = before[idempotency_keys.name]
        count_after, rows_after = after[idempotency_keys.name]
        added = [r for r in rows_after if r not in rows_before]
        assert count_after - count_before == len(added) <= 1, (rows_before, rows_after)
        assert all(tuple(r[:2]) == (account_id, key) for r in added), added
        assert all(r in rows_after for r in rows_before), "a stored outcome changed"
    assert not changed, {name: (before[name], after[name]) for name in changed}


def named(attempt: Attempt) -> tuple[str, str]:
    """The account and idempotency key the server will read from the request, if it parses."""
    request = attempt.request
    if isinstance(request, bytes):
        try:
            request = REQUEST_CLASSES[attempt.method].FromString(request)
        except DecodeError:
            return "", ""
    return (
        getattr(request, "account_id", ""),
        getattr(request, "idempotency_key", ""),
    )


async def send(channel: grpc.aio.Channel, attempt: Attempt) -> Outcome:
    if isinstance(attempt.request, bytes):
        # No serializers: the bytes go out as they are.
        call: Any = channel.unary_unary(
            SERVICE_PATH + attempt.method, request_serializer=None, response_deserializer=None
        )
        payload: Any = attempt.request
    else:
        request_class = type(attempt.request)
        call = channel.unary_unary(
            SERVICE_PATH + attempt.method,
            request_serializer=request_class.SerializeToString,
            response_deserializer=None,
        )
        payload = attempt.request
    try:
        await call(payload, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as error:
        return Outcome(
            error.code(), error.details() or "", field_violations(error), error_reason(error)
        )
    return Outcome(grpc.StatusCode.OK, "", [], "")


def describe(attempt: Attempt) -> str:
    shown = repr(attempt.request)
    return f"{attempt.method} {shown[:600]}"


# ---- the property --------------------------------------------------------------------------------


async def make_targets(stub: Any, prefix: str) -> Targets:
    t = Targets(prefix=prefix, main=prefix + "main", locked=prefix + "locked")
    for account, amount in ((t.main, 1000), (t.locked, 100)):
        added = await stub.AddCredits(
            pb.AddCreditsRequest(
                account_id=account,
                amount=amount,
                idempotency_key="fund",
                source=pb.GRANT_SOURCE_ADMIN,
            )
        )
        t.grant_ids.append(added.grant.grant_id)
        t.used_keys.add((account, "fund"))
    expiring = await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=t.main,
            amount=500,
            idempotency_key="expiring",
            source=pb.GRANT_SOURCE_PROMOTION,
            expires_at=Timestamp(seconds=int(time.time()) + 365 * 86_400),
        )
    )
    t.grant_ids.append(expiring.grant.grant_id)
    t.used_keys.add((t.main, "expiring"))

    async def hold(account: str, key: str, amount: int) -> str:
        reserved = await stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=amount, idempotency_key=key)
        )
        t.used_keys.add((account, key))
        t.reservation_ids.append(reserved.reservation.reservation_id)
        return str(reserved.reservation.reservation_id)

    await hold(t.main, "pending", 50)
    committed = await hold(t.main, "committed", 20)
    await stub.Commit(pb.CommitRequest(account_id=t.main, reservation_id=committed, amount=15))
    released = await hold(t.main, "released", 10)
    await stub.Release(pb.ReleaseRequest(account_id=t.main, reservation_id=released))
    await hold(t.locked, "pending", 5)  # another account's: NOT_FOUND under t.main
    await stub.SetAccountStatus(
        pb.SetAccountStatusRequest(account_id=t.locked, status=pb.ACCOUNT_STATUS_LOCKED)
    )
    page = await stub.History(pb.HistoryRequest(account_id=t.main, page_size=2))
    t.page_tokens.append(page.next_page_token)
    return t


def check_outcome(attempt: Attempt, outcome: Outcome, key_reused: bool) -> None:
    shown = f"{describe(attempt)} -> {outcome.code.name}: {outcome.details[:300]}"
    allowed = outcome.code in ANSWERS or (
        outcome.code is grpc.StatusCode.ALREADY_EXISTS and key_reused
    )
    assert allowed, shown
    if outcome.code is grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.violations, f"no field violations: {shown}"
        assert all(f and d for f, d in outcome.violations), shown
    if outcome.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        assert outcome.reason, f"no ErrorInfo reason: {shown}"


@pytest.mark.slow
async def test_hostile_requests_to_every_rpc_are_refused_cleanly_and_change_nothing(
    start_server: Any, database_url: str, accounts: Any
) -> None:
    server = await start_server(database_url)
    t = await make_targets(server.stub, accounts.prefix)
    engine = create_engine(database_url)
    loop = asyncio.get_running_loop()
    seen: Counter[tuple[str, str]] = Counter()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async def exchange(attempt: Attempt) -> tuple[Outcome, LedgerState, LedgerState]:
        account_id, _ = named(attempt)
        before = await ledger_state(engine, t.prefix, account_id)
        outcome = await send(server.channel, attempt)
        after = await ledger_state(engine, t.prefix, account_id)
        return outcome, before, after

    # Hypothesis runs in a thread of its own; every call and query runs on this test's loop,
    # where the server and the channel live.
    @settings(
        max_examples=EXAMPLES_MAX,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        report_multiple_bugs=False,
    )
    @given(attempt=attempts(t))
    def property_(attempt: Attempt) -> None:
        account_id, key = named(attempt)
        key_reused = (account_id, key) in t.used_keys
        outcome, before, after = run(exchange(attempt))
        seen[(attempt.method, "raw" if isinstance(attempt.request, bytes) else "typed")] += 1
        seen[(outcome.code.name, "")] += 1
        if key and outcome.code in KEY_STORING:
            t.used_keys.add((account_id, key))
        check_outcome(attempt, outcome, key_reused)
        if outcome.code is not grpc.StatusCode.OK or attempt.method in READ_ONLY:
            try:
                assert_unchanged(before, after, outcome, account_id, key)
            except AssertionError as error:
                shown = f"{describe(attempt)} -> {outcome.code.name}: {outcome.details[:300]}"
                raise AssertionError(f"the ledger changed: {shown}\n{error}") from None

    try:
        await asyncio.to_thread(property_)
    finally:
        await engine.dispose()
    assert all(seen[(method, "typed")] for method in METHODS), seen
    assert sum(seen[(method, "raw")] for method in METHODS) > EXAMPLES_MAX // 5, seen
    assert seen[("INVALID_ARGUMENT", "")] > EXAMPLES_MAX // 2, seen


# ---- found by the fuzz: error statuses must stay within what a default client accepts ---------
# An INVALID_ARGUMENT status once quoted every violation without a bound; past 8 KiB of trailers
# a default gRPC client drops the response and reports RESOURCE_EXHAUSTED ("retry later").


async def invalid_argument_naming(server: Any, method: str, request: Message, field: str) -> None:
    attempt = Attempt(method, request)
    outcome = await send(server.channel, attempt)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (
        f"{len(request.SerializeToString())}-byte request -> {outcome.code.name}: "
        f"{outcome.details[:200]}"
    )
    assert any(f == field or f.startswith(field + "[") for f, _ in outcome.violations)


async def test_history_naming_300_unknown_kinds_is_invalid_argument(
    start_server: Any, sqlite_url: str, accounts: Any
) -> None:
    """A 318-byte request. Unknown kinds each get a violation, and the kinds limit (16) counts
    only the known ones, so nothing bounds them."""
    server = await start_server(sqlite_url)
    request = pb.HistoryRequest(account_id=accounts("a"), kinds=[99] * 300)
    await invalid_argument_naming(server, "History", request, "kinds")


async def test_add_credits_with_hostile_text_in_every_field_is_invalid_argument(
    start_server: Any, sqlite_url: str
) -> None:
    """A 3.6 KB request: each text field, and each of 16 metadata keys, quotes 40 characters of
    its bad value, each escaped to as many as 10."""
    server = await start_server(sqlite_url)
    bad = "\U000e0001" * 40
    request = pb.AddCreditsRequest(
        account_id=bad,
        credit_type=bad[:32],
        amount=0,
        idempotency_key=bad,
        action=bad,
        request_id=bad,
        external_ref=bad,
        metadata={bad[:39] + chr(0xE0100 + i): "\x00" for i in range(16)},
    )
    await invalid_argument_naming(server, "AddCredits", request, "account_id")
