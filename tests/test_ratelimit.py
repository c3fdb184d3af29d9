"""Rate limits: token buckets taken all or nothing, shared through Redis, local when it fails.

Every behaviour runs twice: on Redis (two limiter instances stand for two server replicas) and
in-process. Tests that pass `now_ms` move time by hand and expect exact delays; the others run
on the limiter's own clock (Redis `TIME`, or the monotonic clock) and allow a few ms.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio as redis_asyncio
from conftest import delete_redis_namespace, hanging_redis, new_redis_namespace
from google.rpc import code_pb2, error_details_pb2, status_pb2
from processes import free_port
from rich_errors import error_reason, rich_status

from credits.v1 import credits_pb2 as pb
from server.ratelimit import (
    ERROR_REASON,
    LocalRateLimiter,
    RateKey,
    RateLimitConfig,
    RateLimiter,
    RateLimitGate,
    RateLimitKind,
    RedisRateLimiter,
    RetryAfter,
    rate_keys,
    rate_limited_status,
)
from server.status import ERROR_DOMAIN
from store import limits
from store.batching import AdmissionCall

NOW_MS = 1_800_000_000_000  # a fixed start for tests that move time by hand
# Slow enough that nothing refills while a test runs.
RATE_NO_REFILL = 0.001
# Generous: a loaded CI machine must not push a healthy Redis into the fallback.
TEST_REDIS_TIMEOUT_MS = 2_000
# The limiter's own clock moves while a test runs; delays measured on it may be this much short.
CLOCK_SLACK_MS = 15

Replicas = Callable[[], RateLimiter]


def caller_key(rate_per_second: float, burst: int, subject: str = "svc", cost: int = 1) -> RateKey:
    return RateKey(RateLimitKind.CALLER_CALLS, subject, rate_per_second, burst, cost)


def account_key(rate_per_second: float, burst: int, subject: str = "user:1") -> RateKey:
    return RateKey(RateLimitKind.ACCOUNT_RESERVES, subject, rate_per_second, burst)


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "local"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    """replicas() -> a limiter. On Redis each call is a new instance (another server replica)
    sharing the buckets; in-process every call returns the one limiter of the process."""
    if request.param == "local":
        local = LocalRateLimiter()
        yield lambda: local
        return
    url = request.getfixturevalue("redis_url")
    namespace = new_redis_namespace()
    made: list[RedisRateLimiter] = []

    def make() -> RateLimiter:
        limiter = RedisRateLimiter(url, namespace=namespace, timeout_ms=TEST_REDIS_TIMEOUT_MS)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        assert limiter.counters.redis_errors == 0, "a healthy Redis must not be bypassed"
        await limiter.close()
    await delete_redis_namespace(url, namespace)


async def grant_count(limiter: RateLimiter, keys: list[RateKey], now_ms: int | None) -> int:
    """How many acquires succeed in a row before the first refusal."""
    granted = 0
    while await limiter.acquire(keys, now_ms) is None:
        granted += 1
        assert granted <= 10_000, "never refused"
    return granted


async def test_a_full_bucket_grants_its_burst_then_refuses_with_the_exact_wait(
    replicas: Replicas,
) -> None:
    limiter, key = replicas(), caller_key(10, 5)
    assert await grant_count(limiter, [key], NOW_MS) == 5
    assert await limiter.acquire([key], NOW_MS) == RetryAfter(100, key)
    assert await limiter.acquire([key], NOW_MS + 40) == RetryAfter(60, key)
    assert await limiter.acquire([key], NOW_MS + 100) is None
    assert limiter.counters.granted == 6
    assert limiter.counters.refused == 3


async def test_the_bucket_refills_at_the_configured_rate_up_to_its_burst(
    replicas: Replicas,
) -> None:
    limiter, key = replicas(), caller_key(10, 5)
    assert await grant_count(limiter, [key], NOW_MS) == 5
    # 250 ms at 10/s: 2.5 tokens. Two calls pass; the third needs the half token still missing.
    assert await grant_count(limiter, [key], NOW_MS + 250) == 2
    assert await limiter.acquire([key], NOW_MS + 250) == RetryAfter(50, key)
    assert await grant_count(limiter, [key], NOW_MS + 300) == 1
    # An hour idle refills to the burst, not beyond.
    assert await grant_count(limiter, [key], NOW_MS + 3_600_000) == 5


async def test_the_retry_delay_on_the_limiters_own_clock_is_enough_and_not_more(
    replicas: Replicas,
) -> None:
    limiter, key = replicas(), caller_key(20, 2, subject="real-clock")
    assert await grant_count(limiter, [key], None) == 2
    retry = await limiter.acquire([key], None)
    assert retry is not None and retry.key == key
    assert 50 - CLOCK_SLACK_MS <= retry.delay_ms <= 50
    await asyncio.sleep(retry.delay_ms / 1000)
    assert await limiter.acquire([key], None) is None


async def test_a_call_takes_from_all_its_buckets_or_from_none(replicas: Replicas) -> None:
    limiter = replicas()
    caller, account = caller_key(10, 5), account_key(1, 2)
    assert await grant_count(limiter, [caller, account], NOW_MS) == 2
    # The account bucket is empty: refused, and the caller's 3 tokens left are untouched.
    assert await limiter.acquire([caller, account], NOW_MS) == RetryAfter(1000, account)
    assert await grant_count(limiter, [caller], NOW_MS) == 3
    # Both short: the answer is the longest wait, so one retry after it passes both.
    assert await limiter.acquire([caller, account], NOW_MS + 10) == RetryAfter(990, account)
    assert await limiter.acquire([caller, account], NOW_MS + 1000) is None


async def test_many_calls_checked_at_once_are_decided_in_order_each_all_or_nothing(
    replicas: Replicas,
) -> None:
    """A batch's checks in one step: each call as acquire() would decide it, in order, a later
    call seeing what an earlier one took."""
    limiter = replicas()
    caller = caller_key(RATE_NO_REFILL, 3, subject="batch")
    account = account_key(RATE_NO_REFILL, 1, subject="user:batch")
    answers = await limiter.acquire_many(
        [[caller, account], [caller, account], [], [caller], [caller], [caller]]
    )
    # The second call finds the account bucket empty and takes nothing from the caller's, so
    # the caller's third token goes to the fifth call and the sixth finds none.
    assert [None if a is None else a.key for a in answers] == [
        None, account, None, None, None, caller
    ]  # fmt: skip
    assert (limiter.counters.granted, limiter.counters.refused) == (3, 2)
    assert await limiter.acquire([caller]) is not None, "the checks took what they granted"


@pytest.mark.redis
async def test_a_batch_of_rate_checks_is_one_round_trip_in_the_callers_task(
    redis_url: str,
) -> None:
    """The gate checks a group-commit batch's calls in its caller's task, in one Redis round
    trip: no task per call (each would cost a loop iteration on the batch's path)."""
    namespace = new_redis_namespace()
    limiter = RedisRateLimiter(redis_url, namespace=namespace, timeout_ms=TEST_REDIS_TIMEOUT_MS)
    gate = RateLimitGate(limiter, RateLimitConfig(account_reserves_per_second=RATE_NO_REFILL,
                                                  account_reserves_burst=10))  # fmt: skip
    calls = [AdmissionCall("svc", "Reserve", f"user:{i % 25}", 1) for i in range(50)]
    loop = asyncio.get_running_loop()
    tasks_made = 0
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        nonlocal tasks_made
        tasks_made += 1
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    raw = redis_asyncio.Redis.from_url(redis_url)
    try:
        await gate.admit(calls[:1])  # connects and loads the script
        before = await evalsha_calls(raw)
        loop.set_task_factory(counting_factory)
        try:
            refusals = await gate.admit(calls)
        finally:
            loop.set_task_factory(default_factory)
        assert await evalsha_calls(raw) - before == 1
    finally:
        await gate.close()
        await raw.aclose()
        await delete_redis_namespace(redis_url, namespace)
    assert tasks_made == 0
    assert refusals == [None] * 50
    assert limiter.counters.granted == 51


async def evalsha_calls(raw: redis_asyncio.Redis) -> int:
    """EVALSHA commands Redis has run since its start (INFO commandstats)."""
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_cost_above_the_burst_waits_for_a_full_bucket_and_empties_it(
    replicas: Replicas,
) -> None:
    limiter = replicas()
    small, large = caller_key(100, 50, cost=10), caller_key(100, 50, cost=80)
    assert await limiter.acquire([small], NOW_MS) is None
    assert await limiter.acquire([large], NOW_MS) == RetryAfter(100, large)
    assert await limiter.acquire([large], NOW_MS + 100) is None
    assert await limiter.acquire([small], NOW_MS + 100) == RetryAfter(100, small)


async def test_concurrent_acquires_grant_exactly_the_burst_across_replicas(
    replicas: Replicas,
) -> None:
    first, second = replicas(), replicas()
    key = caller_key(RATE_NO_REFILL, 50, subject="stampede")
    answers = await asyncio.gather(
        *(limiter.acquire([key]) for _ in range(100) for limiter in (first, second))
    )
    assert sum(answer is None for answer in answers) == 50
    assert all(answer is None or answer.key == key for answer in answers)
    # Nothing refills in the meantime, so the next call is refused too.
    assert await first.acquire([key]) is not None


async def test_two_distinct_buckets_with_one_subject_do_not_share_tokens(
    replicas: Replicas,
) -> None:
    limiter = replicas()
    calls = caller_key(RATE_NO_REFILL, 1, subject="user:1")
    reserves = account_key(RATE_NO_REFILL, 1, subject="user:1")
    assert await limiter.acquire([calls], NOW_MS) is None
    assert await limiter.acquire([reserves], NOW_MS) is None


async def test_no_buckets_means_no_limit(replicas: Replicas) -> None:
    limiter = replicas()
    for _ in range(100):
        assert await limiter.acquire([], NOW_MS) is None


def test_naming_one_bucket_twice_is_a_bug() -> None:
    key = caller_key(1, 1)
    with pytest.raises(AssertionError):
        asyncio.run(LocalRateLimiter().acquire([key, key]))


@pytest.mark.redis
async def test_a_bucket_key_expires_when_the_bucket_would_be_full_again(redis_url: str) -> None:
    namespace = new_redis_namespace()
    limiter = RedisRateLimiter(redis_url, namespace=namespace, timeout_ms=TEST_REDIS_TIMEOUT_MS)
    raw = redis_asyncio.Redis.from_url(redis_url)
    try:
        quick, slow = caller_key(100, 5, subject="quick"), caller_key(1, 5, subject="slow")
        assert await limiter.acquire([quick, slow]) is None
        # One token at 100/s comes back in 10 ms; at 1/s in 1000 ms (+1 ms of margin).
        assert 0 < await raw.pttl(limiter.redis_key(quick)) <= 11
        assert 900 < await raw.pttl(limiter.redis_key(slow)) <= 1001
        await asyncio.sleep(0.05)
        assert await raw.exists(limiter.redis_key(quick)) == 0
        assert await raw.exists(limiter.redis_key(slow)) == 1
        keys = [key async for key in raw.scan_iter(match=f"{namespace}*")]
        assert keys == [limiter.redis_key(slow).encode()]
    finally:
        await limiter.close()
        await raw.aclose()
        await delete_redis_namespace(redis_url, namespace)


async def test_the_local_limiter_keeps_a_bounded_number_of_buckets() -> None:
    limiter = LocalRateLimiter(buckets_max=2)
    drained = caller_key(RATE_NO_REFILL, 1, subject="drained")
    assert await limiter.acquire([drained], NOW_MS) is None
    assert await limiter.acquire([drained], NOW_MS) is not None
    for subject in ("b", "c"):
        assert await limiter.acquire([caller_key(RATE_NO_REFILL, 1, subject=subject)]) is None
    # The least recently used bucket was forgotten, so it counts as full again.
    assert await limiter.acquire([drained], NOW_MS) is None


async def test_unreachable_redis_limits_in_process_without_failing_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)
    key = caller_key(RATE_NO_REFILL, 3)
    try:
        with caplog.at_level(logging.WARNING, logger="server.ratelimit"):
            assert await grant_count(limiter, [key], None) == 3
            assert await limiter.acquire([key], None) is not None
    finally:
        await limiter.close()
    assert limiter.counters.redis_errors >= 1
    assert limiter.counters.local_fallbacks == 5
    assert (limiter.counters.granted, limiter.counters.refused) == (3, 2)
    warnings = [r for r in caplog.records if r.name == "server.ratelimit"]
    assert len(warnings) == 1, "failures are logged at most once per interval"


async def test_unreachable_redis_checks_a_batch_in_process() -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)
    key = caller_key(RATE_NO_REFILL, 2)
    try:
        answers = await limiter.acquire_many([[key], [], [key], [key]])
    finally:
        await limiter.close()
    assert [a is None for a in answers] == [True, True, True, False]
    assert limiter.counters.redis_errors == 1
    assert limiter.counters.local_fallbacks == 3


async def test_a_hanging_redis_costs_at_most_the_timeout() -> None:
    async with hanging_redis() as url:
        limiter = RedisRateLimiter(url, timeout_ms=100)
        try:
            started = time.monotonic()
            assert await limiter.acquire([caller_key(10, 1)]) is None
            elapsed_ms = (time.monotonic() - started) * 1000
        finally:
            await limiter.close()
    assert limiter.counters.local_fallbacks == 1
    assert 100 <= elapsed_ms < 500


@pytest.mark.redis
async def test_redis_killed_mid_run_falls_back_to_local_limits(
    private_redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = private_redis
    raw = redis_asyncio.Redis.from_url(url, socket_timeout=1)
    for _ in range(50):  # wait for the private server to accept connections
        try:
            await raw.ping()
            break
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.1)
    limiter = RedisRateLimiter(url, timeout_ms=TEST_REDIS_TIMEOUT_MS)
    key = caller_key(RATE_NO_REFILL, 3)
    try:
        assert await grant_count(limiter, [key], None) == 3
        assert await raw.exists(limiter.redis_key(key)) == 1, "the bucket lived in Redis"
        assert limiter.counters.local_fallbacks == 0
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        # The in-process buckets start full: the limit holds again, per replica, at once.
        assert await grant_count(limiter, [key], None) == 3
    finally:
        await limiter.close()
        await raw.aclose()
    assert limiter.counters.redis_errors >= 1
    assert limiter.counters.local_fallbacks == 4


def test_rate_keys_limit_spending_by_caller_and_reserves_by_account() -> None:
    config = RateLimitConfig()
    for method in ("CheckCredits", "History", "AddCredits", "SetAccountStatus", "ClawBack"):
        assert rate_keys(config, caller="svc", method=method, account_id="user:1") == []
    check = rate_keys(config, caller="svc", method="Commit", account_id="user:1", amount=5)
    assert check == [
        RateKey(
            RateLimitKind.CALLER_CALLS,
            "svc",
            limits.RATE_CALLER_PER_SECOND_DEFAULT,
            limits.RATE_CALLER_BURST_DEFAULT,
        )
    ]
    reserve = rate_keys(config, caller="svc", method="Reserve", account_id="user:1", amount=5)
    assert reserve == [
        *check,
        RateKey(
            RateLimitKind.ACCOUNT_RESERVES,
            "user:1",
            limits.RATE_ACCOUNT_RESERVES_PER_SECOND_DEFAULT,
            limits.RATE_ACCOUNT_RESERVES_BURST_DEFAULT,
        ),
    ]


def test_rate_keys_count_credits_when_a_credit_rate_is_set() -> None:
    config = RateLimitConfig(account_credits_per_second=1000)
    keys = rate_keys(config, caller="svc", method="Reserve", account_id="user:1", amount=300)
    assert keys[-1] == RateKey(RateLimitKind.ACCOUNT_CREDITS, "user:1", 1000, 2000, cost=300)


def test_a_rate_of_zero_turns_a_limit_off() -> None:
    config = RateLimitConfig(caller_per_second=0, account_reserves_per_second=0)
    assert rate_keys(config, caller="svc", method="Reserve", account_id="user:1", amount=5) == []


def test_an_account_or_amount_validation_will_refuse_adds_no_account_bucket() -> None:
    config = RateLimitConfig(account_credits_per_second=1000)
    for account_id, amount in (("", 5), ("bad account", 5), ("x" * 129, 5)):
        keys = rate_keys(
            config, caller="svc", method="Reserve", account_id=account_id, amount=amount
        )
        assert [key.kind for key in keys] == [RateLimitKind.CALLER_CALLS]
    keys = rate_keys(config, caller="svc", method="Reserve", account_id="user:1", amount=0)
    assert RateLimitKind.ACCOUNT_CREDITS not in [key.kind for key in keys]


def test_a_long_caller_name_is_keyed_by_a_short_digest() -> None:
    keys = rate_keys(RateLimitConfig(), caller="c" * 10_000, method="Release")
    assert len(keys[0].bucket) < 64
    other = rate_keys(RateLimitConfig(), caller="c" * 9_999 + "d", method="Release")
    assert keys[0].bucket != other[0].bucket


def test_a_bad_configuration_is_refused_naming_its_variable() -> None:
    with pytest.raises(ValueError, match="CREDITS_RATE_CALLER_PER_SECOND=-1"):
        RateLimitConfig(caller_per_second=-1)
    with pytest.raises(ValueError, match="CREDITS_RATE_ACCOUNT_RESERVES_BURST"):
        RateLimitConfig(account_reserves_burst=limits.RATE_BURST_MAX + 1)
    with pytest.raises(ValueError, match="CREDITS_RATE_ACCOUNT_CREDITS_PER_SECOND"):
        RateLimitConfig(account_credits_per_second=float("nan"))


def test_a_refusal_becomes_resource_exhausted_with_retry_and_error_info() -> None:
    key = account_key(200, 400, subject="user:42")
    status = rate_limited_status(RetryAfter(1250, key))
    assert status.code.value[0] == code_pb2.RESOURCE_EXHAUSTED
    assert "account 'user:42'" in status.details and "1250 ms" in status.details
    (raw,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(raw)
    retry_info, error_info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(retry_info) and rich.details[1].Unpack(error_info)
    assert retry_info.retry_delay.ToMilliseconds() == 1250
    assert (error_info.domain, error_info.reason) == (ERROR_DOMAIN, ERROR_REASON)
    assert dict(error_info.metadata) == {
        "limit": "account",
        "kind": "account_reserves",
        "account_id": "user:42",
        "rate_per_second": "200",
        "burst": "400",
        "retry_delay_ms": "1250",
    }
    caller = rate_limited_status(RetryAfter(1, caller_key(2000, 4000, subject="svc")))
    assert "caller 'svc'" in caller.details


async def test_the_gate_refuses_a_reserve_once_the_account_has_spent_its_burst() -> None:
    config = RateLimitConfig(account_reserves_per_second=RATE_NO_REFILL, account_reserves_burst=2)
    gate = RateLimitGate(LocalRateLimiter(), config)
    reserve = pb.ReserveRequest(account_id="user:7", amount=5, idempotency_key="k")
    for _ in range(2):
        assert await gate.check(caller="svc", method="Reserve", request=reserve) is None
    refused = await gate.check(caller="other", method="Reserve", request=reserve)
    assert refused is not None and refused.code.value[0] == code_pb2.RESOURCE_EXHAUSTED
    assert "account 'user:7'" in refused.details
    # Other methods and other accounts do not draw on that account's Reserve bucket.
    check = pb.CheckCreditsRequest(account_id="user:7", amount=5)
    assert await gate.check(caller="svc", method="CheckCredits", request=check) is None
    elsewhere = pb.ReserveRequest(account_id="user:8", amount=5, idempotency_key="k")
    assert await gate.check(caller="svc", method="Reserve", request=elsewhere) is None
    await gate.close()


# ---- through the real server -------------------------------------------------------------------


@pytest.mark.parametrize("with_redis", [False, True], ids=["in-process", "redis"])
async def test_the_server_refuses_spending_past_the_account_rate_with_retry_info(
    start_server: Any,
    database_url: str,
    accounts: Callable[[str], str],
    with_redis: bool,
    request: pytest.FixtureRequest,
) -> None:
    """Reserve draws on the account's bucket; reads do not. A refused Reserve changes nothing and
    tells the client how long to wait. On Postgres the ledger checks a whole group-commit batch
    at once; on SQLite each call is checked before it reaches the ledger."""
    overrides: dict[str, object] = {}
    namespace = new_redis_namespace()
    redis_url = str(request.getfixturevalue("redis_url")) if with_redis else ""
    if with_redis:
        overrides = {"redis_url": redis_url, "redis_namespace": namespace}
    server = await start_server(
        database_url,
        rate_limits=RateLimitConfig(
            account_reserves_per_second=RATE_NO_REFILL, account_reserves_burst=2
        ),
        **overrides,
    )
    account = accounts("spender")
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=10, idempotency_key="fund", source=pb.GRANT_SOURCE_PURCHASE
        )
    )
    try:
        for i in range(2):
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=account, amount=1, idempotency_key=f"r{i}")
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r2")
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rich_status(refused.value).details
        retry = [d for d in details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1
        assert error_reason(refused.value) == "RATE_LIMITED"
        for _ in range(5):  # reads are never limited
            balance = await server.stub.CheckCredits(
                pb.CheckCreditsRequest(account_id=account, consistent=True)
            )
        assert (balance.available, balance.reserved) == (8, 2)
        history = await server.stub.History(pb.HistoryRequest(account_id=account))
        assert len(history.entries) == 3  # the grant and two reserves: the refused one left none
        # Nothing was stored under the refused key: once allowed, the same request goes ahead.
        batcher = server.app.ledger.reserve_batcher
        assert (batcher is not None) == database_url.startswith("postgresql")
    finally:
        if with_redis:
            await delete_redis_namespace(redis_url, namespace)


@pytest.mark.postgres
async def test_a_batch_of_concurrent_reserves_admits_exactly_the_burst(
    start_server: Any, postgres_url: str, accounts: Callable[[str], str]
) -> None:
    """Twenty Reserves at once on one account whose bucket holds five: the batch's rate checks
    go to the limiter together and exactly five get through."""
    server = await start_server(
        postgres_url,
        rate_limits=RateLimitConfig(
            account_reserves_per_second=RATE_NO_REFILL, account_reserves_burst=5
        ),
    )
    account = accounts("burst")
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=100, idempotency_key="fund", source=pb.GRANT_SOURCE_PURCHASE
        )
    )

    async def reserve(i: int) -> str:
        try:
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=account, amount=1, idempotency_key=f"r{i}")
            )
            return "OK"
        except grpc.aio.AioRpcError as error:
            return error.code().name

    outcomes = await asyncio.gather(*(reserve(i) for i in range(20)))
    assert sorted(outcomes).count("OK") == 5
    assert outcomes.count("RESOURCE_EXHAUSTED") == 15
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (balance.available, balance.reserved) == (95, 5)
    batcher = server.app.ledger.reserve_batcher
    assert batcher is not None and batcher.counters.largest_batch > 1
