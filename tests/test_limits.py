"""Every documented limit, proved through the real gRPC server with real stubs.

1. Each limit accepts a value at the limit and rejects one just beyond it with INVALID_ARGUMENT
   carrying a google.rpc.BadRequest whose field violations name the field.
2. Malformed bytes never yield INTERNAL (or UNKNOWN): garbage, invalid UTF-8, truncated varints,
   huge strings and Hypothesis-generated payloads; requests over 64 KiB are refused by the
   transport with RESOURCE_EXHAUSTED.
3. A rejected request changes nothing: balances, History and every table stay as they were, and
   the idempotency key stays free.

The server runs on a manual clock so the time limits can be probed to the microsecond.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from processes import open_blocking_channel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from credits.v1 import credits_pb2 as pb
from store import limits
from store.clock import ManualClock
from store.history import encode_cursor
from store.model import HistoryQuery
from store.schema import (
    accounts as accounts_table,
)
from store.schema import (
    grants,
    idempotency_keys,
    journal,
    reservation_slices,
    reservations,
    wallets,
)

NOW_US = 1_800_000_000_000_000  # 2027-01-15T08:00:00Z, the manual clock's (frozen) time
SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
AMOUNT_MAX = limits.AMOUNT_MAX
TIMESTAMP_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
TIMESTAMP_SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
METHODS = ("CheckCredits", "Reserve", "Commit", "Release", "AddCredits", "History")
SERVICE_PATH = "/credits.v1.CreditsService/"
REQUEST_CLASSES: dict[str, type[Message]] = {
    "CheckCredits": pb.CheckCreditsRequest,
    "Reserve": pb.ReserveRequest,
    "Commit": pb.CommitRequest,
    "Release": pb.ReleaseRequest,
    "AddCredits": pb.AddCreditsRequest,
    "History": pb.HistoryRequest,
}
# Balance every Reserve/Commit/Release rejection test starts from, so "unchanged" means something.
FUNDED = 1000


def ts(us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


# ---- requests ---------------------------------------------------------------------------------
# A case's overrides are field values; a callable value is called with the test's account id.

BASE_FIELDS: dict[str, dict[str, Any]] = {
    "CheckCredits": {},
    "Reserve": {"amount": 10, "idempotency_key": "reserve-1"},
    "Commit": {"reservation_id": "no-such-reservation"},
    "Release": {"reservation_id": "no-such-reservation"},
    "AddCredits": {"amount": 10, "idempotency_key": "add-1", "source": pb.GRANT_SOURCE_PURCHASE},
    "History": {},
}


def build(method: str, account: str, overrides: dict[str, Any]) -> Message:
    fields: dict[str, Any] = {"account_id": account, **BASE_FIELDS[method]}
    for name, value in overrides.items():
        fields[name] = value(account) if callable(value) else value
    return REQUEST_CLASSES[method](**fields)


def padded(length: int) -> Callable[[str], str]:
    """An account id of exactly `length` characters that still starts with the test's prefix."""
    return lambda account: account.ljust(length, "a")


def metadata(entries: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(entries)}


@dataclass(frozen=True)
class Case:
    method: str
    label: str
    overrides: dict[str, Any]
    field: str = ""  # rejection: the field the BadRequest must name
    code: grpc.StatusCode = grpc.StatusCode.OK  # acceptance: the expected outcome

    @property
    def id(self) -> str:
        return f"{self.method}-{self.label}"


# ---- the table of limits ----------------------------------------------------------------------

REJECTED: list[Case] = []
ACCEPTED: list[Case] = []


def reject(methods: tuple[str, ...] | str, label: str, field: str, **overrides: Any) -> None:
    for method in (methods,) if isinstance(methods, str) else methods:
        REJECTED.append(Case(method, label, overrides, field=field))


def accept(methods: tuple[str, ...] | str, label: str, **overrides: Any) -> None:
    """Validation passes: OK, or NOT_FOUND for Commit/Release of an unknown reservation."""
    for method in (methods,) if isinstance(methods, str) else methods:
        expected = (
            grpc.StatusCode.NOT_FOUND if method in ("Commit", "Release") else grpc.StatusCode.OK
        )
        ACCEPTED.append(Case(method, label, overrides, code=expected))


# account_id: 1..128 of [A-Za-z0-9._:@/+-], starting with a letter or digit. Every method.
accept(METHODS, "account-128", account_id=padded(128))
accept(METHODS, "account-alphabet", account_id=lambda a: a + "AZaz09._:@/+-")
accept(METHODS, "account-leading-digit", account_id=lambda a: "9" + a)
for label, bad in {
    "account-129": "a" * 129,
    "account-empty": "",
    "account-space": "user 42",
    "account-unicode": "üser:42",
    "account-leading-dash": "-user",
    "account-leading-dot": ".user",
    "account-leading-colon": ":user",
    "account-hash": "user#42",
    "account-nul": "user\x00",
    "account-trailing-newline": "user\n",
}.items():
    reject(METHODS, label, "account_id", account_id=bad)

# credit_type: 1..32 of [a-z0-9_] starting with a letter; empty means "default".
TYPED = ("CheckCredits", "Reserve", "AddCredits", "History")
accept(TYPED, "credit-type-32", credit_type="c" * 32)
accept(TYPED, "credit-type-alphabet", credit_type="a_z09")
accept(TYPED, "credit-type-empty", credit_type="")
for label, bad in {
    "credit-type-33": "c" * 33,
    "credit-type-uppercase": "Default",
    "credit-type-leading-digit": "1ai",
    "credit-type-leading-underscore": "_ai",
    "credit-type-dash": "skip-trace",
    "credit-type-unicode": "crédit",
    "credit-type-space": "a i",
}.items():
    reject(TYPED, label, "credit_type", credit_type=bad)

# idempotency_key: 1..128 visible ASCII (0x21..0x7E).
KEYED = ("Reserve", "AddCredits")
accept(KEYED, "key-128", idempotency_key="k" * 128)
accept(KEYED, "key-visible-ascii", idempotency_key="!~" + "".join(map(chr, range(0x21, 0x7F))))
for label, bad in {
    "key-129": "k" * 129,
    "key-empty": "",
    "key-space": "key 1",
    "key-tab": "key\t1",
    "key-del": "key\x7f",
    "key-unicode": "ключ",
}.items():
    reject(KEYED, label, "idempotency_key", idempotency_key=bad)

# amount: 1..10^12 to grant or reserve, 0..10^12 to check or commit.
accept(KEYED, "amount-1", amount=1)
accept(KEYED, "amount-max", amount=AMOUNT_MAX)
accept("CheckCredits", "amount-0", amount=0)
accept("CheckCredits", "amount-max", amount=AMOUNT_MAX)
accept("Commit", "amount-0", amount=0)
accept("Commit", "amount-max", amount=AMOUNT_MAX)
for label, bad in {
    "amount-0": 0,
    "amount-minus-1": -1,
    "amount-max-plus-1": AMOUNT_MAX + 1,
    "amount-int64-min": -(2**63),
    "amount-int64-max": 2**63 - 1,
}.items():
    reject(KEYED, label, "amount", amount=bad)
    if bad != 0:
        reject(("CheckCredits", "Commit"), label, "amount", amount=bad)

# ttl_seconds: 0 (server default) or 1..the configured maximum (3600 by default).
accept("Reserve", "ttl-0-default", ttl_seconds=0)
accept("Reserve", "ttl-1", ttl_seconds=1)
accept("Reserve", "ttl-3600", ttl_seconds=limits.HOLD_TTL_SECONDS_MAX_DEFAULT)
for label, bad in {
    "ttl-3601": limits.HOLD_TTL_SECONDS_MAX_DEFAULT + 1,
    "ttl-86400": limits.HOLD_TTL_SECONDS_CEILING,
    "ttl-minus-1": -1,
    "ttl-int32-max": 2**31 - 1,
    "ttl-int32-min": -(2**31),
}.items():
    reject("Reserve", label, "ttl_seconds", ttl_seconds=bad)

# priority: 0..1000.
accept("AddCredits", "priority-0", priority=0)
accept("AddCredits", "priority-1000", priority=1000)
for label, bad in {
    "priority-1001": 1001,
    "priority-minus-1": -1,
    "priority-int32-min": -(2**31),
}.items():
    reject("AddCredits", label, "priority", priority=bad)

# metadata: at most 16 entries; keys 1..64 of [a-z0-9_.-] starting with a letter; values at
# most 256 characters without control characters.
accept(KEYED, "metadata-16-entries", metadata=metadata(16))
accept(KEYED, "metadata-key-64", metadata={"k" * 64: "v"})
accept(KEYED, "metadata-key-alphabet", metadata={"a-z_0.9": "v"})
accept(KEYED, "metadata-value-256", metadata={"k": "v" * 256})
accept(KEYED, "metadata-value-256-unicode", metadata={"k": "é" * 256})
accept(KEYED, "metadata-value-empty", metadata={"k": ""})
reject(KEYED, "metadata-17-entries", "metadata", metadata=metadata(17))
for label, bad_key in {
    "metadata-key-65": "k" * 65,
    "metadata-key-empty": "",
    "metadata-key-uppercase": "Key",
    "metadata-key-leading-digit": "1k",
    "metadata-key-space": "a key",
    "metadata-key-unicode": "clé",
}.items():
    reject(KEYED, label, "metadata", metadata={bad_key: "v"})
for label, bad_value in {
    "metadata-value-257": "v" * 257,
    "metadata-value-nul": "a\x00b",
    "metadata-value-newline": "a\nb",
    "metadata-value-tab": "a\tb",
    "metadata-value-del": "a\x7fb",
    "metadata-value-c1-nel": "a\x85b",  # U+0085, a (C1) control character
    "metadata-value-c1-csi": "a\x9bb",  # U+009B, a (C1) control character
}.items():
    reject(KEYED, label, "metadata", metadata={"k": bad_value})

# action: 0..64 of [a-z0-9_.:/-]; request_id: 0..128 visible ASCII.
LABELLED = ("Reserve", "AddCredits")
accept((*LABELLED, "History"), "action-64", action="a" * 64)
accept((*LABELLED, "History"), "action-alphabet", action="skiptrace.lookup:v2/a_b-c0")
for label, bad in {
    "action-65": "a" * 65,
    "action-uppercase": "Skiptrace",
    "action-space": "skip trace",
    "action-unicode": "acción",
}.items():
    reject((*LABELLED, "History"), label, "action", action=bad)
accept(LABELLED, "request-id-128", request_id="r" * 128)
for label, bad in {
    "request-id-129": "r" * 129,
    "request-id-space": "req 1",
    "request-id-unicode": "réq",
}.items():
    reject(LABELLED, label, "request_id", request_id=bad)

# external_ref: 0..255 visible ASCII.
accept("AddCredits", "external-ref-255", external_ref="x" * 255)
for label, bad in {"external-ref-256": "x" * 256, "external-ref-space": "in 1"}.items():
    reject("AddCredits", label, "external_ref", external_ref=bad)

# source: required, a known GrantSource.
reject("AddCredits", "source-unspecified", "source", source=pb.GRANT_SOURCE_UNSPECIFIED)
reject("AddCredits", "source-unknown-99", "source", source=99)
reject("AddCredits", "source-negative", "source", source=-1)

# effective_at: at most 7 days in the past, 400 days in the future.
# expires_at: after now and effective_at, at most 10 years ahead.
EXPIRES_MAX_US = limits.GRANT_EXPIRES_FUTURE_MAX_US
accept("AddCredits", "effective-7-days-ago", effective_at=ts(NOW_US - 7 * DAY_US))
accept("AddCredits", "effective-400-days-ahead", effective_at=ts(NOW_US + 400 * DAY_US))
accept("AddCredits", "expires-1us-ahead", expires_at=ts(NOW_US + 1))
accept("AddCredits", "expires-10-years", expires_at=ts(NOW_US + EXPIRES_MAX_US))
accept(
    "AddCredits",
    "expires-after-future-effective",
    effective_at=ts(NOW_US + DAY_US),
    expires_at=ts(NOW_US + DAY_US + 1),
)
reject(
    "AddCredits",
    "effective-7-days-1us-ago",
    "effective_at",
    effective_at=ts(NOW_US - 7 * DAY_US - 1),
)
reject(
    "AddCredits",
    "effective-400-days-1us",
    "effective_at",
    effective_at=ts(NOW_US + 400 * DAY_US + 1),
)
reject("AddCredits", "expires-in-past", "expires_at", expires_at=ts(NOW_US - SECOND_US))
reject("AddCredits", "expires-now", "expires_at", expires_at=ts(NOW_US))
reject(
    "AddCredits", "expires-10-years-1us", "expires_at", expires_at=ts(NOW_US + EXPIRES_MAX_US + 1)
)
reject(
    "AddCredits",
    "expires-before-effective",
    "expires_at",
    effective_at=ts(NOW_US + 10 * DAY_US),
    expires_at=ts(NOW_US + 5 * DAY_US),
)
reject(
    "AddCredits",
    "expires-at-effective",
    "expires_at",
    effective_at=ts(NOW_US + DAY_US),
    expires_at=ts(NOW_US + DAY_US),
)

# Timestamps outside google.protobuf.Timestamp's range (0001-01-01..9999-12-31) or with bad nanos.
BAD_TIMESTAMPS = {
    "year-10000": Timestamp(seconds=TIMESTAMP_SECONDS_MAX + 1),
    "int64-max-seconds": Timestamp(seconds=2**63 - 1),
    "year-0": Timestamp(seconds=TIMESTAMP_SECONDS_MIN - 1),
    "negative-nanos": Timestamp(seconds=NOW_US // SECOND_US, nanos=-1),
    "nanos-1e9": Timestamp(seconds=NOW_US // SECOND_US, nanos=10**9),
}
for label, bad_ts in BAD_TIMESTAMPS.items():
    reject("AddCredits", f"effective-{label}", "effective_at", effective_at=bad_ts)
    reject("AddCredits", f"expires-{label}", "expires_at", expires_at=bad_ts)
    reject("History", f"start-{label}", "start_time", start_time=bad_ts)
    reject("History", f"end-{label}", "end_time", end_time=bad_ts)

# History: page_size 0 (50) or 1..500; a span of at most 366 days; known kinds (at most 16).
accept("History", "page-size-0", page_size=0)
accept("History", "page-size-1", page_size=1)
accept("History", "page-size-500", page_size=500)
accept("History", "span-366-days", start_time=ts(NOW_US - 366 * DAY_US), end_time=ts(NOW_US))
accept("History", "start-year-1", start_time=Timestamp(seconds=TIMESTAMP_SECONDS_MIN))
accept("History", "end-year-9999", end_time=Timestamp(seconds=TIMESTAMP_SECONDS_MAX))
accept("History", "all-kinds", kinds=list(range(1, 7)))
accept("History", "kinds-16", kinds=[pb.ENTRY_KIND_GRANT] * 16)
accept("History", "reservation-id-64", reservation_id="r" * 64)
for label, bad in {
    "page-size-501": 501,
    "page-size-minus-1": -1,
    "page-size-int32-min": -(2**31),
}.items():
    reject("History", label, "page_size", page_size=bad)
reject(
    "History",
    "span-366-days-1us",
    "end_time",
    start_time=ts(NOW_US - 366 * DAY_US - 1),
    end_time=ts(NOW_US),
)
reject("History", "span-empty", "end_time", start_time=ts(NOW_US), end_time=ts(NOW_US))
reject("History", "span-reversed", "end_time", start_time=ts(NOW_US), end_time=ts(NOW_US - 1))
reject("History", "kind-unspecified", "kinds", kinds=[pb.ENTRY_KIND_UNSPECIFIED])
reject("History", "kind-unknown-99", "kinds", kinds=[99])
reject("History", "kind-negative", "kinds", kinds=[-1])
reject("History", "kinds-17", "kinds", kinds=[pb.ENTRY_KIND_GRANT] * 17)
reject("History", "reservation-id-65", "reservation_id", reservation_id="r" * 65)
reject("History", "reservation-id-space", "reservation_id", reservation_id="r 1")
reject("History", "page-token-garbage", "page_token", page_token="not a token!")
reject("History", "page-token-base64-garbage", "page_token", page_token="bm90IGpzb24")
reject("History", "page-token-513", "page_token", page_token="A" * 513)
reject(
    "History",
    "page-token-json-infinity",
    "page_token",
    page_token=base64.urlsafe_b64encode(b'{"t": Infinity, "c": "x", "s": 1, "f": "x"}').decode(),
)
reject(
    "History",
    "page-token-json-1e999",
    "page_token",
    page_token=base64.urlsafe_b64encode(b'{"t": 1e999, "c": "x", "s": 1, "f": "x"}').decode(),
)

# reservation_id (Commit/Release): 1..64 visible ASCII. A well-formed unknown id is NOT_FOUND.
accept(("Commit", "Release"), "reservation-id-64", reservation_id="r" * 64)
for label, bad in {
    "reservation-id-65": "r" * 65,
    "reservation-id-empty": "",
    "reservation-id-space": "res 1",
    "reservation-id-unicode": "résa",
}.items():
    reject(("Commit", "Release"), label, "reservation_id", reservation_id=bad)


# ---- helpers ----------------------------------------------------------------------------------


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0], "rich status code differs from call's"
            return status
    raise AssertionError(f"{error.code().name} without grpc-status-details-bin: {error.details()}")


def violations(error: grpc.aio.AioRpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (
        f"expected INVALID_ARGUMENT, got {error.code().name}: {error.details()}"
    )
    status = rich_status(error)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(bad_request.field_violations)
    assert found, f"INVALID_ARGUMENT without BadRequest field violations: {status}"
    assert all(v.field and v.description for v in found), found
    return found


def names(field: str, found: list[error_details_pb2.BadRequest.FieldViolation]) -> bool:
    """`metadata` also matches the per-entry `metadata[key]` violations."""
    return any(v.field == field or v.field.startswith(field + "[") for v in found)


async def call(server: Any, method: str, request: Message) -> Any:
    return await getattr(server.stub, method)(request, timeout=10)


async def rejected(server: Any, method: str, request: Message) -> grpc.aio.AioRpcError:
    try:
        response = await call(server, method, request)
    except grpc.aio.AioRpcError as error:
        return error
    shown = text_format.MessageToString(request, as_one_line=True)[:300]
    raise AssertionError(f"{method} accepted {shown}: {type(response).__name__}")


async def table_counts(engine: AsyncEngine) -> dict[str, int]:
    tables = (
        accounts_table,
        wallets,
        grants,
        reservations,
        reservation_slices,
        journal,
        idempotency_keys,
    )
    async with engine.connect() as conn:
        return {
            t.name: int(await conn.scalar(select(func.count()).select_from(t)) or 0) for t in tables
        }


async def snapshot(server: Any, account: str) -> tuple[Any, ...]:
    """Everything a rejected request must leave alone: the account's balances and journal, and
    the row count of every table."""
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    history = await server.stub.History(pb.HistoryRequest(account_id=account, page_size=500))
    return (
        (balance.available, balance.reserved, balance.balance, balance.account_status),
        [e.SerializeToString() for e in history.entries],
        await table_counts(server.app.engine),
    )


async def fund(server: Any, account: str, amount: int, credit_type: str = "") -> None:
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            credit_type=credit_type,
            amount=amount,
            idempotency_key=f"fund-{credit_type}",
            source=pb.GRANT_SOURCE_ADMIN,
        )
    )


@pytest.fixture
async def server(start_server: Any, database_url: str) -> Any:
    return await start_server(database_url, clock=ManualClock(NOW_US))


# ---- 1 + 3: the limits, and nothing changes on rejection ---------------------------------------


def grouped(cases: list[Case], key: Callable[[Case], str]) -> dict[str, list[Case]]:
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(key(case), []).append(case)
    return groups


# One server per group keeps the file fast; every case still gets its own account, and a group
# reports every case that failed, by id.
REJECTED_GROUPS = grouped(REJECTED, lambda c: f"{c.method}-{c.field}")
ACCEPTED_GROUPS = grouped(ACCEPTED, lambda c: c.method)


async def check_rejected(server: Any, account: str, case: Case) -> None:
    if case.method in ("Reserve", "Commit", "Release"):
        await fund(server, account, FUNDED)
    before = await snapshot(server, account)

    error = await rejected(server, case.method, build(case.method, account, case.overrides))

    found = violations(error)
    assert names(case.field, found), f"no violation names {case.field!r}: {found}"
    after = await snapshot(server, account)
    assert after == before, f"a rejected request changed the ledger: {before} -> {after}"
    if case.method == "AddCredits":
        balance, entries, _ = after
        assert balance[:3] == (0, 0, 0) and entries == [], after


async def check_accepted(server: Any, account: str, case: Case) -> None:
    request = build(case.method, account, case.overrides)
    if case.method == "Reserve":
        await fund(server, request.account_id, AMOUNT_MAX, request.credit_type)
    try:
        await call(server, case.method, request)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
        assert code is case.code, f"{code.name}: {error.details()}"
    assert code is case.code, f"OK, expected {case.code.name}"


async def run_cases(
    server: Any, accounts: Any, cases: list[Case], check: Callable[..., Any]
) -> None:
    failures = []
    for i, case in enumerate(cases):
        try:
            await check(server, accounts(f"c{i}"), case)
        except AssertionError as error:
            failures.append(f"{case.id}: {error}".splitlines()[0][:400])
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("cases", REJECTED_GROUPS.values(), ids=REJECTED_GROUPS.keys())
async def test_rejected_beyond_the_limit(server: Any, accounts: Any, cases: list[Case]) -> None:
    await run_cases(server, accounts, cases, check_rejected)


@pytest.mark.parametrize("cases", ACCEPTED_GROUPS.values(), ids=ACCEPTED_GROUPS.keys())
async def test_accepted_at_the_limit(server: Any, accounts: Any, cases: list[Case]) -> None:
    await run_cases(server, accounts, cases, check_accepted)


async def test_accepted_values_are_kept(server: Any, accounts: Any) -> None:
    """Defaults and at-the-limit values arrive unchanged: empty credit_type is "default",
    absent priority is 100, ttl_seconds 0 is 300 s and the maximum is 3600 s."""
    account = accounts("a")
    added = await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            credit_type="",
            amount=AMOUNT_MAX,
            idempotency_key="k" * 128,
            source=pb.GRANT_SOURCE_PROMOTION,
            metadata={"k" * 64: "é" * 256, **metadata(15)},
            external_ref="x" * 255,
            action="a" * 64,
            request_id="r" * 128,
        )
    )
    assert added.grant.credit_type == "default"
    assert added.grant.priority == limits.PRIORITY_DEFAULT
    assert added.grant.metadata["k" * 64] == "é" * 256
    assert added.entry.action == "a" * 64
    assert added.entry.request_id == "r" * 128
    for credit_type in ("", "default"):
        check = await server.stub.CheckCredits(
            pb.CheckCreditsRequest(
                account_id=account, credit_type=credit_type, amount=AMOUNT_MAX, consistent=True
            )
        )
        assert (check.allowed, check.available, check.balance) == (True, AMOUNT_MAX, AMOUNT_MAX)

    for ttl, lifetime in ((0, limits.HOLD_TTL_SECONDS_DEFAULT), (1, 1), (3600, 3600)):
        reserved = await server.stub.Reserve(
            pb.ReserveRequest(
                account_id=account, amount=1, idempotency_key=f"ttl-{ttl}", ttl_seconds=ttl
            )
        )
        hold = reserved.reservation
        assert hold.credit_type == "default"
        assert (
            hold.expires_at.ToMicroseconds() - hold.created_at.ToMicroseconds()
            == lifetime * SECOND_US
        )


async def test_configured_ttl_maximum(start_server: Any, database_url: str, accounts: Any) -> None:
    server = await start_server(
        database_url,
        clock=ManualClock(NOW_US),
        hold_ttl_seconds_default=120,
        hold_ttl_seconds_max=7200,
    )
    account = accounts("a")
    await fund(server, account, FUNDED)
    for ttl, lifetime in ((0, 120), (7200, 7200)):
        reserved = await server.stub.Reserve(
            pb.ReserveRequest(
                account_id=account, amount=1, idempotency_key=f"t{ttl}", ttl_seconds=ttl
            )
        )
        hold = reserved.reservation
        assert (
            hold.expires_at.ToMicroseconds() - hold.created_at.ToMicroseconds()
            == lifetime * SECOND_US
        )
    before = await snapshot(server, account)
    error = await rejected(
        server,
        "Reserve",
        pb.ReserveRequest(account_id=account, amount=1, idempotency_key="t7201", ttl_seconds=7201),
    )
    assert names("ttl_seconds", violations(error))
    assert await snapshot(server, account) == before


async def test_commit_above_reserved(server: Any, accounts: Any) -> None:
    account = accounts("a")
    await fund(server, account, FUNDED)
    hold = (
        await server.stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r")
        )
    ).reservation
    before = await snapshot(server, account)

    for amount in (11, AMOUNT_MAX):
        error = await rejected(
            server,
            "Commit",
            pb.CommitRequest(account_id=account, reservation_id=hold.reservation_id, amount=amount),
        )
        assert names("amount", violations(error))
    assert await snapshot(server, account) == before

    # Still pending, so committing exactly the reserved amount works afterwards.
    committed = await server.stub.Commit(
        pb.CommitRequest(account_id=account, reservation_id=hold.reservation_id, amount=10)
    )
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert committed.reservation.amount_committed == 10


async def test_rejected_request_leaves_its_idempotency_key_free(server: Any, accounts: Any) -> None:
    account = accounts("a")
    for i, (method, bad, good) in enumerate(
        (
            ("AddCredits", {"amount": AMOUNT_MAX + 1}, {"amount": 100}),
            ("AddCredits", {"amount": 100, "source": 0}, {"amount": 100}),
            ("Reserve", {"amount": 0}, {"amount": 10}),
            ("Reserve", {"amount": 10, "ttl_seconds": 3601}, {"amount": 10}),
        )
    ):
        request = build(method, account, {"idempotency_key": f"same-{i}", **bad})
        violations(await rejected(server, method, request))
        # Same key, corrected request: a fresh outcome, not ALREADY_EXISTS.
        await call(server, method, build(method, account, {"idempotency_key": f"same-{i}", **good}))
    check = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (check.available, check.reserved) == (180, 20)


async def test_history_page_token(server: Any, accounts: Any) -> None:
    account = accounts("a")
    for i in range(3):
        await server.stub.AddCredits(
            pb.AddCreditsRequest(
                account_id=account, amount=1, idempotency_key=f"g{i}", source=pb.GRANT_SOURCE_SIGNUP
            )
        )
    first = await server.stub.History(pb.HistoryRequest(account_id=account, page_size=2))
    assert len(first.entries) == 2 and first.next_page_token
    second = await server.stub.History(
        pb.HistoryRequest(account_id=account, page_size=2, page_token=first.next_page_token)
    )
    assert [e.sequence for e in second.entries] == [1]
    assert not second.next_page_token

    # A token only continues the listing it came from.
    error = await rejected(
        server,
        "History",
        pb.HistoryRequest(account_id=account, credit_type="ai", page_token=first.next_page_token),
    )
    assert names("page_token", violations(error))

    # Forged tokens that carry the right filter digest but positions no journal can hold: the
    # server may serve them or reject them (INVALID_ARGUMENT naming page_token), never INTERNAL.
    query = HistoryQuery(account_id=account)
    failures = []
    for created_at_us, credit_type, sequence in (
        (2**63, "default", 1),
        (10**30, "default", 1),
        (1, "default", 2**63),
        (-(10**30), "default", -1),
        (1, "de\x00fault", 1),
    ):
        token = encode_cursor(query, created_at_us, credit_type, sequence)
        request = pb.HistoryRequest(account_id=account, page_token=token)
        try:
            await server.stub.History(request)
        except grpc.aio.AioRpcError as error:
            try:
                assert names("page_token", violations(error))
            except AssertionError as wrong:
                failures.append(f"forged cursor {(created_at_us, credit_type, sequence)}: {wrong}")
    assert not failures, "\n".join(line.splitlines()[0] for line in failures)


# ---- 2: malformed bytes -----------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_field(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def raw_call(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(SERVICE_PATH + method)  # no serializers: bytes in, bytes out


GARBAGE: dict[str, bytes] = {
    "ff-ff-ff": b"\xff\xff\xff",
    "invalid-utf8-field-1": string_field(1, b"\xff\xfe"),
    "invalid-utf8-field-2": string_field(2, b"ok\xc3\x28"),
    "utf8-surrogate": string_field(1, b"\xed\xa0\x80"),
    "truncated-varint": b"\x18\xff\xff\xff",
    "truncated-length": b"\x0a\x10abc",
    "stray-end-group": b"\x0c",
    "field-number-0": b"\x00\x01",
    "varint-11-bytes": b"\x18" + b"\xff" * 10 + b"\x01",
    "nul-bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_bytes_are_invalid_argument(server: Any, payload: bytes) -> None:
    for method in METHODS:
        try:
            await raw_call(server.channel, method)(payload, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert names("request", violations(error)), method
        else:
            raise AssertionError(f"{method} accepted {payload!r}")


async def test_invalid_utf8_inside_a_map_is_invalid_argument(server: Any, accounts: Any) -> None:
    account = string_field(1, accounts("a").encode())
    for method, map_field in (("Reserve", 8), ("AddCredits", 10)):
        for entry in (
            string_field(1, b"\xff"),
            string_field(1, b"k") + string_field(2, b"\xc0\xaf"),
        ):
            payload = account + string_field(map_field, entry)
            try:
                await raw_call(server.channel, method)(payload, timeout=10)
            except grpc.aio.AioRpcError as error:
                assert names("request", violations(error)), method
            else:
                raise AssertionError(f"{method} accepted {payload!r}")


async def test_request_size_limit(server: Any) -> None:
    """Just under 64 KiB is read and rejected by validation; just over is refused by the
    transport with RESOURCE_EXHAUSTED. Never INTERNAL."""
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    over = limits.REQUEST_BYTES_MAX + 1
    for method in METHODS:
        # A valid request, then account_id (field 1 in every request; the last one wins)
        # padded so the whole message is exactly `size` bytes: tag 1 byte + length 3 bytes.
        base = build(method, "a", {}).SerializeToString()
        sizes = [(60_000, invalid), (limits.REQUEST_BYTES_MAX, invalid), (over, exhausted)]
        if method == "Reserve":  # each refusal costs the transport ~0.1 s: one method is enough
            sizes.append((4 * limits.REQUEST_BYTES_MAX, exhausted))
        for size, expected in sizes:
            payload = base + string_field(1, b"a" * (size - len(base) - 4))
            assert len(payload) == size
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await raw_call(server.channel, method)(payload, timeout=10)
            assert raised.value.code() is expected, (method, size, raised.value.details())
            if expected is invalid:
                assert names("account_id", violations(raised.value)), (method, size)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw_call(server.channel, "Commit")(b"\xff" * over, timeout=10)
    assert raised.value.code() is exhausted, raised.value.details()


# Hypothesis: random bytes, and random well-formed-ish protobuf fields, to every method.
FUZZ_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    # A generated payload may reuse a small idempotency key with a different request.
    grpc.StatusCode.ALREADY_EXISTS,
}
_field = st.one_of(
    st.builds(
        lambda n, v: varint(n << 3) + varint(v), st.integers(1, 16), st.integers(0, 2**64 - 1)
    ),
    st.builds(
        string_field,
        st.integers(1, 16),
        st.one_of(st.binary(max_size=96), st.text(max_size=48).map(str.encode)),
    ),
    st.builds(
        lambda n, b: varint(n << 3 | 1) + b, st.integers(1, 16), st.binary(min_size=8, max_size=8)
    ),
    st.builds(
        lambda n, b: varint(n << 3 | 5) + b, st.integers(1, 16), st.binary(min_size=4, max_size=4)
    ),
)
_payload = st.one_of(
    st.binary(max_size=2048).map(lambda b: (b, False)),
    st.lists(_field, max_size=16).map(lambda fields: (b"".join(fields), True)),
)


async def test_random_bytes_never_internal(server: Any, accounts: Any) -> None:
    own_account = string_field(1, accounts("fuzz").encode())
    seen: dict[grpc.StatusCode, int] = {}

    # The property runs in a thread on a blocking channel; the server keeps this event loop.
    def run_property() -> None:
        with open_blocking_channel(server.address) as channel:
            stubs = {m: channel.unary_unary(SERVICE_PATH + m) for m in METHODS}

            @settings(
                max_examples=250,
                derandomize=True,
                database=None,
                deadline=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink),
                suppress_health_check=list(HealthCheck),
            )
            @given(method=st.sampled_from(METHODS), payload=_payload)
            def property_(method: str, payload: tuple[bytes, bool]) -> None:
                data, structured = payload
                if structured:
                    # proto3: the last account_id wins, so whatever parses stays in this test's
                    # account space.
                    data += own_account
                try:
                    stubs[method](data, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()  # type: ignore[attr-defined]
                    details = error.details()  # type: ignore[attr-defined]
                    assert code in FUZZ_ALLOWED, f"{method} {data!r} -> {code.name}: {details}"
                seen[code] = seen.get(code, 0) + 1

            property_()

    await asyncio.to_thread(run_property)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen


async def test_seeded_random_bytes_never_internal(server: Any) -> None:
    """The same property without Hypothesis: a fixed list of seeded random payloads."""
    rng = random.Random(20_270_115)
    for _ in range(120):
        method = rng.choice(METHODS)
        payload = rng.randbytes(rng.randint(0, 2048))
        try:
            await raw_call(server.channel, method)(payload, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() in FUZZ_ALLOWED, (method, payload, error.details())
