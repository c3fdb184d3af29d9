"""Rate limits: per caller across every RPC, and per account on spending (Reserve).

A runaway client can drain an account or the service in seconds. Each limit is a token bucket
that holds at most `burst` tokens and refills at `rate_per_second`; a call takes `cost` tokens
from every bucket that applies to it.

Rules:
- All or nothing: a call's buckets are checked and taken together, atomically. When any of them
  is short, nothing is taken and the answer is the longest wait (so retrying after it succeeds
  unless someone else spent the refill first).
- A cost above a bucket's burst could never be paid; such a call waits for a full bucket and
  empties it instead, so a large reservation slows the account down but never blocks it for good.
- With Redis, one Lua script per call does the whole check on Redis's clock (`TIME`), so every
  replica shares the buckets and replicas with skewed clocks agree. A bucket key expires when
  the bucket would be full again, so an idle bucket costs nothing and an absent key is a full
  bucket.
- A slow or unreachable Redis never fails a call: that call is limited in-process instead
  (each replica then enforces the limits on its own), the failure is counted and logged at
  most once per interval, and Redis is skipped for a short back-off.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Protocol

import grpc
import redis.asyncio as redis_asyncio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.status import ERROR_DOMAIN, rich_status
from store import limits
from store.batching import AdmissionCall
from store.cache import (
    REDIS_CONNECTIONS_MAX,
    REDIS_TIMEOUT_MS_DEFAULT,
    PipelinedScript,
    RedisBackoff,
    ScriptCall,
)
from store.errors import LedgerError

log = logging.getLogger(__name__)

MICROSECONDS_PER_SECOND: Final = 1_000_000
MICROSECONDS_PER_MILLISECOND: Final = 1_000
# The methods that spend an account's credits, and so count against its spend rate.
SPEND_METHODS: Final = frozenset({"Reserve"})
# Calls that count against their caller's rate: the spend scope. Reads and grants are not limited
# (a check would cost a Redis round trip on the hottest read path, and reads deplete nothing).
CALLER_LIMITED_METHODS: Final = frozenset({"Reserve", "Commit", "Release"})
# Where the bucket keys live under the Redis namespace.
REDIS_KEY_INFIX: Final = "rate:"
ERROR_REASON: Final = "RATE_LIMITED"
# A burst of 0 in the configuration means this many seconds' worth of the rate.
BURST_DERIVED_SECONDS: Final = 2
# Float arithmetic leaves noise (a wait of 90000.00000000001 µs, a level of 0.9999999999999999
# tokens); allowances this small keep a retry after the advertised delay from being refused.
TOKENS_NOISE: Final = 1e-6
DELAY_NOISE_MS: Final = 1e-6

# The environment variable behind each RateLimitConfig field (the server's flags default to it).
ENVIRONMENT_VARIABLES: Final = {
    "caller_per_second": "CREDITS_RATE_CALLER_PER_SECOND",
    "caller_burst": "CREDITS_RATE_CALLER_BURST",
    "account_reserves_per_second": "CREDITS_RATE_ACCOUNT_RESERVES_PER_SECOND",
    "account_reserves_burst": "CREDITS_RATE_ACCOUNT_RESERVES_BURST",
    "account_credits_per_second": "CREDITS_RATE_ACCOUNT_CREDITS_PER_SECOND",
    "account_credits_burst": "CREDITS_RATE_ACCOUNT_CREDITS_BURST",
}


class RateLimitKind(StrEnum):
    CALLER_CALLS = "caller_calls"
    ACCOUNT_RESERVES = "account_reserves"
    ACCOUNT_CREDITS = "account_credits"

    @property
    def limit(self) -> str:
        """What a refused caller is told was exhausted: its own rate or the account's."""
        return "caller" if self is RateLimitKind.CALLER_CALLS else "account"


@dataclass(frozen=True)
class RateKey:
    """One bucket a call draws on: `subject` (a caller name or an account id) under `kind`."""

    kind: RateLimitKind
    subject: str
    rate_per_second: float
    burst: int
    cost: int = 1

    def __post_init__(self) -> None:
        assert math.isfinite(self.rate_per_second), self
        assert 0 < self.rate_per_second <= limits.RATE_PER_SECOND_MAX, self
        assert 1 <= self.burst <= limits.RATE_BURST_MAX, self
        assert 1 <= self.cost <= limits.AMOUNT_MAX, self

    @property
    def bucket(self) -> str:
        return f"{self.kind.value}:{self.subject}"


@dataclass(frozen=True)
class RetryAfter:
    """A refused call: nothing was taken; after `delay_ms` every bucket of it can pay."""

    delay_ms: int
    key: RateKey  # the bucket with the longest wait

    def __post_init__(self) -> None:
        assert self.delay_ms >= 1, self


@dataclass
class RateLimitCounters:
    granted: int = 0
    refused: int = 0
    redis_errors: int = 0
    # Calls limited in-process because Redis failed or was in its back-off.
    local_fallbacks: int = 0


class RateLimiter(Protocol):
    counters: RateLimitCounters

    async def acquire(
        self, keys: Sequence[RateKey], now_ms: int | None = None
    ) -> RetryAfter | None:
        """Takes every key's cost from its bucket and returns None, or takes nothing and says
        how long to wait. `now_ms` replaces the limiter's own clock (tests, simulations)."""
        ...

    async def acquire_many(self, checks: Sequence[Sequence[RateKey]]) -> list[RetryAfter | None]:
        """acquire() for many calls at once, in order, each all or nothing on its own keys (a
        later call sees what an earlier one took): a group-commit batch's rate checks, decided
        in one step (one Redis round trip) instead of one task per call."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class RateLimitConfig:
    """Rates are per second; a rate of 0 turns that limit off; a burst of 0 means
    BURST_DERIVED_SECONDS seconds' worth of the rate."""

    caller_per_second: float = limits.RATE_CALLER_PER_SECOND_DEFAULT
    caller_burst: int = limits.RATE_CALLER_BURST_DEFAULT
    account_reserves_per_second: float = limits.RATE_ACCOUNT_RESERVES_PER_SECOND_DEFAULT
    account_reserves_burst: int = limits.RATE_ACCOUNT_RESERVES_BURST_DEFAULT
    account_credits_per_second: float = limits.RATE_ACCOUNT_CREDITS_PER_SECOND_DEFAULT
    account_credits_burst: int = limits.RATE_ACCOUNT_CREDITS_BURST_DEFAULT

    def __post_init__(self) -> None:
        problems = [
            f"{ENVIRONMENT_VARIABLES[name]}={value!r} is not a number from 0 to "
            f"{limits.RATE_PER_SECOND_MAX:.0f}"
            for name, value in self._rates().items()
            if not (math.isfinite(value) and 0 <= value <= limits.RATE_PER_SECOND_MAX)
        ] + [
            f"{ENVIRONMENT_VARIABLES[name]}={value!r} is not a whole number from 0 to "
            f"{limits.RATE_BURST_MAX}"
            for name, value in self._bursts().items()
            if not 0 <= value <= limits.RATE_BURST_MAX
        ]
        if problems:
            raise ValueError("invalid rate limits: " + "; ".join(problems))

    def _rates(self) -> dict[str, float]:
        return {
            "caller_per_second": self.caller_per_second,
            "account_reserves_per_second": self.account_reserves_per_second,
            "account_credits_per_second": self.account_credits_per_second,
        }

    def _bursts(self) -> dict[str, int]:
        return {
            "caller_burst": self.caller_burst,
            "account_reserves_burst": self.account_reserves_burst,
            "account_credits_burst": self.account_credits_burst,
        }


def _burst(rate_per_second: float, burst: int) -> int:
    if burst:
        return burst
    derived = math.ceil(rate_per_second * BURST_DERIVED_SECONDS)
    return min(max(1, derived), limits.RATE_BURST_MAX)


def _caller_subject(caller: str) -> str:
    if len(caller) <= limits.RATE_CALLER_NAME_LENGTH_MAX:
        return caller
    return "blake2b:" + hashlib.blake2b(caller.encode(), digest_size=16).hexdigest()


def _valid_account(account_id: str) -> bool:
    return len(account_id) <= limits.ACCOUNT_ID_LENGTH_MAX and bool(
        limits.ACCOUNT_ID_PATTERN.fullmatch(account_id)
    )


def rate_keys(
    config: RateLimitConfig, *, caller: str, method: str, account_id: str = "", amount: int = 0
) -> list[RateKey]:
    """The buckets a call draws on. The request is not validated yet: an account id or amount
    that validation will refuse adds no account bucket (the caller's bucket still counts the
    call), so junk never creates keys."""
    keys: list[RateKey] = []
    if method not in CALLER_LIMITED_METHODS:
        return keys
    if config.caller_per_second > 0:
        keys.append(
            RateKey(
                RateLimitKind.CALLER_CALLS,
                _caller_subject(caller),
                config.caller_per_second,
                _burst(config.caller_per_second, config.caller_burst),
            )
        )
    if method not in SPEND_METHODS or not _valid_account(account_id):
        return keys
    if config.account_reserves_per_second > 0:
        keys.append(
            RateKey(
                RateLimitKind.ACCOUNT_RESERVES,
                account_id,
                config.account_reserves_per_second,
                _burst(config.account_reserves_per_second, config.account_reserves_burst),
            )
        )
    if config.account_credits_per_second > 0 and 1 <= amount <= limits.AMOUNT_MAX:
        keys.append(
            RateKey(
                RateLimitKind.ACCOUNT_CREDITS,
                account_id,
                config.account_credits_per_second,
                _burst(config.account_credits_per_second, config.account_credits_burst),
                cost=amount,
            )
        )
    return keys


def _assert_distinct(keys: Sequence[RateKey]) -> None:
    # A bucket named twice would be read twice and written once: it would pay only one cost.
    assert len({key.bucket for key in keys}) == len(keys), [key.bucket for key in keys]


def _delay_ms(wait_us: float) -> int:
    # Rounded up, so a retry after the delay finds the tokens there.
    return max(1, math.ceil(wait_us / MICROSECONDS_PER_MILLISECOND - DELAY_NOISE_MS))


@dataclass
class LocalRateLimiter:
    """The buckets of one process, LRU-bounded. Calls never await inside `acquire`, so on one
    event loop each call is atomic."""

    counters: RateLimitCounters = field(default_factory=RateLimitCounters)
    buckets_max: int = limits.RATE_LOCAL_BUCKETS_MAX
    # bucket -> (tokens, at_us): the level it had at at_us, on this limiter's clock.
    _buckets: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)

    def _level(self, key: RateKey, now_us: int) -> float:
        found = self._buckets.get(key.bucket)
        if found is None:
            return float(key.burst)
        tokens, at_us = found
        # max(0, ...): a caller-supplied clock may step back; time never refunds nor charges.
        refill = max(0, now_us - at_us) * key.rate_per_second / MICROSECONDS_PER_SECOND
        return min(float(key.burst), tokens + refill)

    async def acquire(
        self, keys: Sequence[RateKey], now_ms: int | None = None
    ) -> RetryAfter | None:
        if not keys:
            return None
        _assert_distinct(keys)
        now_us = (
            time.monotonic_ns() // 1000 if now_ms is None else now_ms * MICROSECONDS_PER_MILLISECOND
        )
        levels = [self._level(key, now_us) for key in keys]
        wait_us_max, refusing = 0.0, None
        for key, level in zip(keys, levels, strict=True):
            need = min(key.cost, key.burst)
            if level + TOKENS_NOISE < need:
                wait_us = (need - level) * MICROSECONDS_PER_SECOND / key.rate_per_second
                if wait_us > wait_us_max:
                    wait_us_max, refusing = wait_us, key
        if refusing is not None:
            self.counters.refused += 1
            return RetryAfter(_delay_ms(wait_us_max), refusing)
        for key, level in zip(keys, levels, strict=True):
            left = max(0.0, level - min(key.cost, key.burst))
            assert left <= key.burst, (key, level)
            self._buckets[key.bucket] = (left, now_us)
            self._buckets.move_to_end(key.bucket)
        while len(self._buckets) > self.buckets_max:
            self._buckets.popitem(last=False)
        self.counters.granted += 1
        return None

    async def acquire_many(self, checks: Sequence[Sequence[RateKey]]) -> list[RetryAfter | None]:
        return [await self.acquire(keys) for keys in checks]

    async def close(self) -> None:
        self._buckets.clear()


# KEYS: the buckets. ARGV[1]: now in microseconds, or '' for Redis's clock; ARGV[2]:
# TOKENS_NOISE; then for each key its rate per second, burst and cost. A bucket is
# "<tokens> <at_us>", kept until it would be full again (an absent key is a full bucket).
# Returns {1, '0', 0} when granted, else {0, wait_us, index of the key with the longest wait},
# having written nothing. %.17g writes a double that reads back exactly, so nothing drifts.
_ACQUIRE_SCRIPT = """
-- Checks many calls in one go, in order, each all or nothing on its own buckets:
-- ARGV = now_us or '', noise, then per call: its number of buckets n and n x (rate, burst, cost);
-- KEYS = every call's buckets, call after call. A later call sees what earlier ones took.
-- Returns per call: granted (1/0), the longest wait in us, the 1-based bucket that refused.
local now_us
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[1])
end
local noise = tonumber(ARGV[2])
local replies = {}
local arg = 3
local first_key = 1
while arg <= #ARGV do
  local n = tonumber(ARGV[arg])
  local levels = {}
  local wait_us_max = 0
  local refusing = 0
  for i = 1, n do
    local rate = tonumber(ARGV[arg + 3 * i - 2])
    local burst = tonumber(ARGV[arg + 3 * i - 1])
    local need = math.min(tonumber(ARGV[arg + 3 * i]), burst)
    local level = burst
    local state = redis.call('GET', KEYS[first_key + i - 1])
    if state then
      local tokens, at_us = string.match(state, '^(%S+) (%S+)$')
      local refill = math.max(0, now_us - tonumber(at_us)) * rate / 1000000
      level = math.min(burst, tonumber(tokens) + refill)
    end
    levels[i] = level
    if level + noise < need then
      local wait_us = (need - level) * 1000000 / rate
      if wait_us > wait_us_max then
        wait_us_max = wait_us
        refusing = i
      end
    end
  end
  if refusing > 0 then
    table.insert(replies, 0)
    table.insert(replies, string.format('%.17g', wait_us_max))
    table.insert(replies, refusing)
  else
    for i = 1, n do
      local rate = tonumber(ARGV[arg + 3 * i - 2])
      local burst = tonumber(ARGV[arg + 3 * i - 1])
      local left = math.max(0, levels[i] - math.min(tonumber(ARGV[arg + 3 * i]), burst))
      local full_in_ms = math.ceil((burst - left) * 1000 / rate)
      redis.call('SET', KEYS[first_key + i - 1], string.format('%.17g %.17g', left, now_us),
                 'PX', full_in_ms + 1)
    end
    table.insert(replies, 1)
    table.insert(replies, '0')
    table.insert(replies, 0)
  end
  arg = arg + 1 + 3 * n
  first_key = first_key + n
end
return replies
"""


class RedisRateLimiter:
    """Buckets shared by every replica through Redis; in-process when Redis fails."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "credits:",
        timeout_ms: int = REDIS_TIMEOUT_MS_DEFAULT,
        connections_max: int = REDIS_CONNECTIONS_MAX,
        fallback: LocalRateLimiter | None = None,
    ) -> None:
        assert timeout_ms > 0 and connections_max > 0
        self.counters = RateLimitCounters()
        self.namespace = namespace
        self.timeout_ms = timeout_ms
        self.fallback = LocalRateLimiter() if fallback is None else fallback
        # A blocking pool: a burst of calls waits (at most the timeout) for one of a bounded
        # number of connections instead of falling back to per-replica limits.
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=connections_max,
            timeout=timeout_ms / 1000,
            socket_timeout=timeout_ms / 1000,
            socket_connect_timeout=timeout_ms / 1000,
            decode_responses=True,
        )
        # No retries: a retry would double what a slow Redis costs every call on the hot path.
        self._client = redis_asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._script = PipelinedScript(self._client, _ACQUIRE_SCRIPT)
        self._backoff = RedisBackoff()
        # Checks waiting for the next round trip: (redis keys, script args, clock, answer).
        self._queue: list[
            tuple[
                list[str],
                list[str | int | float],
                str | int,
                asyncio.Future[list[object] | None],
            ]
        ] = []
        self._flusher: asyncio.Task[None] | None = None

    def redis_key(self, key: RateKey) -> str:
        return f"{self.namespace}{REDIS_KEY_INFIX}{key.bucket}"

    def _failed(self, error: BaseException) -> None:
        self.counters.redis_errors += 1
        if self._backoff.failed():
            log.warning(
                "redis rate limit check failed (%s: %s); limiting in-process",
                type(error).__name__,
                error,
                extra={"fields": {"redis_rate_limit_errors_total": self.counters.redis_errors}},
            )

    async def _acquire_locally(
        self, keys: Sequence[RateKey], now_ms: int | None
    ) -> RetryAfter | None:
        self.counters.local_fallbacks += 1
        retry = await self.fallback.acquire(keys, now_ms)
        self._count(retry)
        return retry

    def _count(self, retry: RetryAfter | None) -> None:
        if retry is None:
            self.counters.granted += 1
        else:
            self.counters.refused += 1

    async def acquire(
        self, keys: Sequence[RateKey], now_ms: int | None = None
    ) -> RetryAfter | None:
        if not keys:
            return None
        _assert_distinct(keys)
        if not self._backoff.available():
            return await self._acquire_locally(keys, now_ms)
        now_us = "" if now_ms is None else now_ms * MICROSECONDS_PER_MILLISECOND
        future: asyncio.Future[list[object] | None] = asyncio.get_running_loop().create_future()
        self._queue.append(([self.redis_key(k) for k in keys], _script_args(keys), now_us, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        reply = await future
        if reply is None:
            return await self._acquire_locally(keys, now_ms)
        return self._answer(reply, keys)

    async def acquire_many(self, checks: Sequence[Sequence[RateKey]]) -> list[RetryAfter | None]:
        """In the caller's task, without the queue: a batch's checks are already together."""
        answers: list[RetryAfter | None] = [None] * len(checks)
        todo = [i for i, keys in enumerate(checks) if keys]
        for i in todo:
            _assert_distinct(checks[i])
        if todo and self._backoff.available():
            chunks = [
                todo[start : start + limits.RATE_CHECKS_PER_ROUND_TRIP_MAX]
                for start in range(0, len(todo), limits.RATE_CHECKS_PER_ROUND_TRIP_MAX)
            ]
            calls = [
                _script_call(
                    "",
                    [
                        ([self.redis_key(k) for k in checks[i]], _script_args(checks[i]))
                        for i in chunk
                    ],
                )
                for chunk in chunks
            ]
            try:
                # PipelinedScript bounds its round trip; this also bounds the wait for one of
                # its connections, so a sick Redis adds at most timeout_ms to the batch.
                async with asyncio.timeout(self.timeout_ms / 1000):
                    replies = await self._script.run(calls)
            except Exception as error:  # noqa: BLE001 - any Redis failure: local limits
                self._failed(error)
            else:
                for chunk, reply in zip(chunks, replies, strict=True):
                    for position, i in enumerate(chunk):
                        answers[i] = self._answer(reply[3 * position : 3 * position + 3], checks[i])
                return answers
        for i in todo:
            answers[i] = await self._acquire_locally(checks[i], None)
        return answers

    def _answer(self, reply: Sequence[object], keys: Sequence[RateKey]) -> RetryAfter | None:
        """One call's part of the script's reply: (granted, wait_us, refusing key)."""
        granted, wait_us, refusing = int(str(reply[0])), float(str(reply[1])), int(str(reply[2]))
        retry = None if granted else RetryAfter(_delay_ms(wait_us), keys[refusing - 1])
        self._count(retry)
        return retry

    async def _flush(self) -> None:
        """Sends every queued check in one round trip, as one script call that decides them in
        order, each all or nothing (checks that queue meanwhile go in the next): per call, the
        network and client cost of its own script call would rival the RPC's own work."""
        while self._queue:
            batch = self._queue[: limits.RATE_CHECKS_PER_ROUND_TRIP_MAX]
            del self._queue[: limits.RATE_CHECKS_PER_ROUND_TRIP_MAX]
            # One script call per clock: all of them share Redis's clock unless a test sets one.
            groups: dict[str | int, list[int]] = {}
            for index, (_, _, now_us, _) in enumerate(batch):
                groups.setdefault(now_us, []).append(index)
            calls = [
                _script_call(now_us, [(batch[i][0], batch[i][1]) for i in members])
                for now_us, members in groups.items()
            ]
            try:
                # PipelinedScript bounds its round trip; this also bounds the wait for one of
                # its connections, so a sick Redis adds at most timeout_ms to an RPC.
                async with asyncio.timeout(self.timeout_ms / 1000):
                    replies = await self._script.run(calls)
            except Exception as error:  # noqa: BLE001 - any Redis failure: local limits
                self._failed(error)
                for *_, future in batch:
                    if not future.done():
                        future.set_result(None)
                continue
            for members, reply in zip(groups.values(), replies, strict=True):
                for position, i in enumerate(members):
                    future = batch[i][3]
                    if not future.done():
                        future.set_result(reply[3 * position : 3 * position + 3])

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._script.close()
        await self._client.aclose()
        await self.fallback.close()


def _script_args(keys: Sequence[RateKey]) -> list[str | int | float]:
    """One call's part of _ACQUIRE_SCRIPT's ARGV: its number of keys, then each key's terms."""
    args: list[str | int | float] = [len(keys)]
    for key in keys:
        args += [key.rate_per_second, key.burst, key.cost]
    return args


def _script_call(
    now_us: str | int, checks: Sequence[tuple[list[str], list[str | int | float]]]
) -> ScriptCall:
    """One _ACQUIRE_SCRIPT call deciding `checks` (each: its Redis keys, its _script_args) in
    order, on one clock ('' for Redis's own)."""
    keys = [key for check_keys, _ in checks for key in check_keys]
    args: list[str | int | float] = [now_us, TOKENS_NOISE]
    for _, check_args in checks:
        args += check_args
    return keys, args


def create_rate_limiter(
    redis_url: str, *, namespace: str, timeout_ms: int = REDIS_TIMEOUT_MS_DEFAULT
) -> RateLimiter:
    """Shared buckets when the server has a Redis, this process's own otherwise."""
    if redis_url:
        return RedisRateLimiter(redis_url, namespace=namespace, timeout_ms=timeout_ms)
    return LocalRateLimiter()


@dataclass(frozen=True)
class RateLimitGate:
    """What an RPC wrapper calls before any work: the limiter with its configuration."""

    limiter: RateLimiter
    config: RateLimitConfig

    async def check(self, *, caller: str, method: str, request: object) -> grpc.Status | None:
        """None to go ahead; else the status to refuse the call with (nothing was taken)."""
        if method not in CALLER_LIMITED_METHODS:
            return None
        retry = await self.limiter.acquire(self._keys(caller, method, request))
        return None if retry is None else rate_limited_status(retry)

    async def admit(self, calls: Sequence[AdmissionCall]) -> list[LedgerError | None]:
        """check() for many calls at once (a group-commit batch): their checks go to Redis
        together, in one round trip. A refused call gets a RateLimitedCall to raise."""
        retries = await self.limiter.acquire_many(
            [self._keys(c.principal, c.method, c) for c in calls]
        )
        return [
            None if retry is None else RateLimitedCall(rate_limited_status(retry))
            for retry in retries
        ]

    def _keys(self, caller: str, method: str, request: object) -> list[RateKey]:
        """The buckets a call draws on, from the fields its request has."""
        # Requests without these fields (History of a whole account, say) simply lack them.
        account_id = getattr(request, "account_id", "")
        amount = getattr(request, "amount", 0)
        return rate_keys(
            self.config,
            caller=caller,
            method=method,
            account_id=account_id if isinstance(account_id, str) else "",
            amount=amount if isinstance(amount, int) else 0,
        )

    async def close(self) -> None:
        await self.limiter.close()


class RateLimitedCall(LedgerError):
    """A call refused by a rate check the ledger made in its batch; carries the status."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


def _describe(key: RateKey) -> str:
    rate = f"{key.rate_per_second:g}"
    if key.kind is RateLimitKind.CALLER_CALLS:
        return f"caller '{key.subject}' may make {rate} calls per second (burst {key.burst})"
    if key.kind is RateLimitKind.ACCOUNT_RESERVES:
        return f"account '{key.subject}' may take {rate} Reserves per second (burst {key.burst})"
    return (
        f"account '{key.subject}' may reserve {rate} credits per second (burst {key.burst}); "
        f"this call asked for {key.cost}"
    )


def rate_limited_status(retry: RetryAfter) -> grpc.Status:
    """RESOURCE_EXHAUSTED with RetryInfo (when to retry) and ErrorInfo (which limit)."""
    key = retry.key
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromMilliseconds(retry.delay_ms)
    metadata = {
        "limit": key.kind.limit,
        "kind": key.kind.value,
        "rate_per_second": f"{key.rate_per_second:g}",
        "burst": str(key.burst),
        "retry_delay_ms": str(retry.delay_ms),
        ("caller" if key.kind is RateLimitKind.CALLER_CALLS else "account_id"): key.subject,
    }
    error_info = error_details_pb2.ErrorInfo(
        reason=ERROR_REASON, domain=ERROR_DOMAIN, metadata=metadata
    )
    details = []
    for message in (retry_info, error_info):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    return rich_status(
        code_pb2.RESOURCE_EXHAUSTED,
        f"rate limited: {_describe(key)}, and that is used up; nothing was done. "
        f"Retry in {retry.delay_ms} ms",
        details,
    )
