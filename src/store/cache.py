"""Balance snapshots for fast reads: Redis when configured, in-process otherwise.

Postgres is the only source of truth; the cache holds copies that only CheckCredits reads
(DESIGN.md invariant 5: Reserve, Commit and Release never look at it).

Correctness rules:
- A wallet snapshot carries its version (the wallet's last journal sequence). Writes are
  compare-and-set: an older snapshot never replaces a newer one, whatever order concurrent
  refreshes arrive in.
- Available credits change with time alone (a grant becomes effective or expires), so a snapshot
  carries `valid_until_us`, the next such instant; from then on it is not served.
- Account status has its own versioned snapshot, since one status covers every wallet.
- Snapshots expire after a bounded time, so a refresh lost while Redis was unreachable cannot
  leave a stale copy behind for long.
- A slow or unreachable Redis never fails a call: the read falls back to the database, the
  failure is counted and logged at most once per interval, and Redis is skipped for a short
  back-off before it is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import redis.asyncio as redis_asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from store.model import AccountStatus

log = logging.getLogger(__name__)

# How long a snapshot lives in the cache, whatever happens to refreshes.
REDIS_SNAPSHOT_TTL_MS = 60_000
# Without Redis each replica has its own copy; a short life bounds how stale another replica's
# copy can be when several replicas share a database without Redis.
LOCAL_SNAPSHOT_TTL_MS = 5_000
LOCAL_ENTRIES_MAX = 100_000
# In front of Redis, each replica keeps what it read or wrote for this long: a cache hit then
# costs no network round trip. It bounds how long a write made through ANOTHER replica may go
# unseen by this one's cached reads (this replica's own writes update it at once). 0 turns it off.
NEAR_SNAPSHOT_TTL_MS_DEFAULT = 100
NEAR_SNAPSHOT_TTL_MS_MAX = 5_000
# A near copy read in the last quarter of its life is read again from Redis behind the reader
# (one read per wallet at a time, at most this many at once): a wallet read all the time never
# expires in process, so no reader waits for Redis each time its copy would have, while no copy
# is ever served longer than the near life after it left Redis.
NEAR_REFRESH_AHEAD_SHARE = 0.25
NEAR_REFRESHES_IN_FLIGHT_MAX = 256
# After a Redis failure, skip Redis for this long before trying again.
REDIS_BACKOFF_MS = 1_000
# Log a Redis failure at most once per this interval (they are counted every time).
FAILURE_LOG_INTERVAL_SECONDS = 10.0
REDIS_TIMEOUT_MS_DEFAULT = 50
REDIS_CONNECTIONS_MAX = 32
# Connections each pipelined script (PipelinedScript) keeps open at most, beside the pool's: one
# per round trip in flight (a batch's rate checks, another batch's snapshots).
SCRIPT_CONNECTIONS_MAX = 8


@dataclass(frozen=True)
class WalletSnapshot:
    version: int
    available: int
    reserved: int
    valid_until_us: int
    as_of_us: int

    def encode(self) -> str:
        return (
            f"{self.version}|{self.available}|{self.reserved}|{self.valid_until_us}|{self.as_of_us}"
        )

    @staticmethod
    def decode(raw: str) -> WalletSnapshot:
        version, available, reserved, valid_until_us, as_of_us = (int(x) for x in raw.split("|"))
        return WalletSnapshot(version, available, reserved, valid_until_us, as_of_us)


@dataclass(frozen=True)
class AccountSnapshot:
    version: int
    status: AccountStatus

    def encode(self) -> str:
        return f"{self.version}|{self.status.value}"

    @staticmethod
    def decode(raw: str) -> AccountSnapshot:
        version, status = raw.split("|")
        return AccountSnapshot(int(version), AccountStatus(status))


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    errors: int = 0
    writes: int = 0
    writes_refused_as_older: int = 0
    # Hits answered by the in-process copy in front of Redis (also counted in `hits`).
    near_hits: int = 0
    # Near copies read again from Redis late in their life, behind their readers (each such
    # read is also a lookup: a hit or a miss above).
    near_refreshes: int = 0


class BalanceCache(Protocol):
    counters: CacheCounters
    # Whether this process holds copies of its own (put_wallets_local stores something).
    keeps_local_copy: ClassVar[bool]

    async def get(
        self, account_id: str, credit_type: str
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]: ...

    # What this process holds, without I/O: both snapshots when the wallet's is current at
    # now_us (a hit), else (None, None). The fast path of CheckCredits (server/service.py).
    def get_local(
        self, account_id: str, credit_type: str, now_us: int
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]: ...

    async def put_wallet(
        self, account_id: str, credit_type: str, snapshot: WalletSnapshot
    ) -> None: ...

    async def put_account(self, account_id: str, snapshot: AccountSnapshot) -> None: ...

    # Many wallets' snapshots (a batch's) in two halves, for a writer that answers its callers
    # between them: what this process keeps (no I/O, so it is current before any caller hears
    # of the change) ...
    def put_wallets_local(self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]) -> None: ...

    # ... and what every replica reads (Redis).
    async def put_wallets_shared(
        self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]
    ) -> None: ...

    async def close(self) -> None: ...


Snapshot = WalletSnapshot | AccountSnapshot
# ("w", account_id, credit_type) or ("a", account_id): tuples, so no two wallets share a key.
_LocalKey = tuple[str, ...]
# An entry is a plain tuple of numbers and strings, never an object: the collector stops tracking
# such a tuple once it has seen it, so however many wallets are held, a full collection does not
# walk them. (A snapshot object per entry did: at 10,000 wallets under load, full collections of
# up to 14 ms about once a second, in the p99 of every call; docs/performance.md, lever 13.)
# Wallet: (expires_at, version, available, reserved, valid_until_us, as_of_us), account:
# (expires_at, version, status); expires_at in time.monotonic() seconds.
_Entry = tuple[Any, ...]


_STATUSES = {status.value: status for status in AccountStatus}


def _wallet_snapshot(entry: _Entry) -> WalletSnapshot:
    return WalletSnapshot(entry[1], entry[2], entry[3], entry[4], entry[5])


def _account_snapshot(entry: _Entry) -> AccountSnapshot:
    return AccountSnapshot(entry[1], _STATUSES[entry[2]])


@dataclass
class LocalBalanceCache:
    """In-process snapshots (LRU-bounded) for when no Redis is configured, and the near copy
    in front of Redis."""

    keeps_local_copy: ClassVar[bool] = True
    counters: CacheCounters = field(default_factory=CacheCounters)
    entries_max: int = LOCAL_ENTRIES_MAX
    ttl_ms: int = LOCAL_SNAPSHOT_TTL_MS
    _entries: OrderedDict[_LocalKey, _Entry] = field(default_factory=OrderedDict)

    def _get(self, key: _LocalKey) -> _Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if time.monotonic() >= found[0]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return found

    def _put(self, key: _LocalKey, version: int, *fields: int | str) -> None:
        current = self._get(key)
        if current is not None and current[1] > version:
            self.counters.writes_refused_as_older += 1
            return
        now = time.monotonic()
        self._entries[key] = (now + self.ttl_ms / 1000, version, *fields)
        self._entries.move_to_end(key)
        self.counters.writes += 1
        # Least recently used first: drop from there what has expired, and anything over the
        # bound. A near copy lives 100 ms, so it holds about what was touched in the last 100 ms
        # instead of every wallet up to the bound.
        entries = self._entries
        while entries and (
            len(entries) > self.entries_max or next(iter(entries.values()))[0] <= now
        ):
            entries.popitem(last=False)

    def _put_wallet(self, account_id: str, credit_type: str, snapshot: WalletSnapshot) -> None:
        self._put(
            ("w", account_id, credit_type),
            snapshot.version,
            snapshot.available,
            snapshot.reserved,
            snapshot.valid_until_us,
            snapshot.as_of_us,
        )

    async def get(
        self, account_id: str, credit_type: str
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        wallet = self._get(("w", account_id, credit_type))
        account = self._get(("a", account_id))
        return (
            None if wallet is None else _wallet_snapshot(wallet),
            None if account is None else _account_snapshot(account),
        )

    def expires_within(self, account_id: str, credit_type: str, seconds: float) -> bool:
        """Whether the wallet's or the account's copy ends within `seconds` (or is gone)."""
        deadline = time.monotonic() + seconds
        wallet = self._entries.get(("w", account_id, credit_type))
        account = self._entries.get(("a", account_id))
        return wallet is None or account is None or min(wallet[0], account[0]) <= deadline

    def get_local(
        self, account_id: str, credit_type: str, now_us: int
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        wallet = self._get(("w", account_id, credit_type))
        account = self._get(("a", account_id))
        # wallet[4]: its valid_until_us.
        if wallet is None or account is None or now_us >= wallet[4]:
            return None, None
        return _wallet_snapshot(wallet), _account_snapshot(account)

    async def put_wallet(self, account_id: str, credit_type: str, snapshot: WalletSnapshot) -> None:
        self._put_wallet(account_id, credit_type, snapshot)

    async def put_account(self, account_id: str, snapshot: AccountSnapshot) -> None:
        self._put(("a", account_id), snapshot.version, snapshot.status.value)

    def put_wallets_local(self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]) -> None:
        for account_id, credit_type, snapshot in snapshots:
            self._put_wallet(account_id, credit_type, snapshot)

    async def put_wallets_shared(
        self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]
    ) -> None:
        pass  # nothing is shared

    async def close(self) -> None:
        self._entries.clear()


ScriptCall = tuple[list[str], list[str | int | float]]


def _resp_argument(part: str | int | float | bytes) -> bytes:
    if isinstance(part, bytes):
        return part
    return (repr(part) if isinstance(part, float) else str(part)).encode()


def _resp_command(*parts: str | int | float | bytes) -> bytes:
    """One command in Redis's wire format, its arguments encoded as redis-py encodes them."""
    encoded = [_resp_argument(part) for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded
    )


class PipelinedScript:
    """One Lua script called many times in one round trip (EVALSHA each), each call atomic.

    It sends on redis-py connections of its own, made with the client's settings (URL,
    credentials, TLS, timeouts), with the commands encoded here: a redis-py pipeline costs about
    125 us of CPU per round trip, this about half, and the hot path makes one or two round
    trips per group-commit batch (docs/performance.md).

    EVALSHA straight away, never SCRIPT EXISTS first. Calls refused with NOSCRIPT (Redis
    restarted or flushed its scripts) ran nothing, so only those are sent again, once the script
    is loaded. A connection that failed or was interrupted mid-reply is closed, never reused.

    The client's socket timeout bounds the whole round trip here, not each socket operation:
    redis-py bounds a send with asyncio.wait_for, which makes a task per send, a loop iteration
    on the path of every group-commit batch.
    """

    def __init__(self, client: redis_asyncio.Redis, source: str) -> None:
        self._pool = client.connection_pool
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(SCRIPT_CONNECTIONS_MAX)
        timeout_seconds = self._pool.connection_kwargs.get("socket_timeout")
        self._timeout_seconds: float | None = (
            None if timeout_seconds is None else float(timeout_seconds)
        )

    async def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """The script's reply to each call, in order; raises what Redis answered if any failed."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else self._new_connection()
            try:
                async with asyncio.timeout(self._timeout_seconds):
                    results = await self._run_on(conn, calls)
            except BaseException:
                # Replies may be left unread on it: it can serve no one else.
                await conn.disconnect(nowait=True)
                raise
            self._idle.append(conn)
        for reply in results:
            if isinstance(reply, Exception):
                raise reply
        return results

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()

    def _new_connection(self) -> AbstractConnection:
        # The pool's settings (URL, credentials, TLS, connect timeout) without the per-operation
        # socket timeout: run() bounds the round trip instead.
        kwargs = {**self._pool.connection_kwargs, "socket_timeout": None}
        connection: AbstractConnection = self._pool.connection_class(**kwargs)
        return connection

    async def _run_on(self, conn: AbstractConnection, calls: Sequence[ScriptCall]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            await conn.send_packed_command(
                b"".join(
                    _resp_command("EVALSHA", self.sha, len(calls[i][0]), *calls[i][0], *calls[i][1])
                    for i in pending
                ),
                check_health=False,
            )
            for i in pending:
                try:
                    results[i] = await conn.read_response()
                except ResponseError as refused:  # an error reply: the others still come
                    results[i] = refused
            pending = [i for i in pending if isinstance(results[i], NoScriptError)]
            if not pending:
                break
            if attempt == 0:
                await conn.send_packed_command(
                    _resp_command("SCRIPT", "LOAD", self.source), check_health=False
                )
                await conn.read_response()
        return results


def wallet_key(namespace: str, account_id: str, credit_type: str) -> str:
    # The braces make Redis Cluster keep an account's keys in one slot.
    return f"{namespace}{{{account_id}}}:w:{credit_type}"


def account_key(namespace: str, account_id: str) -> str:
    return f"{namespace}{{{account_id}}}:a"


# Compare-and-set on the version prefix "<version>|...": only a newer or equal version replaces.
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+)|'))
  if version and version > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


class RedisBackoff:
    """What every Redis user here does after a failure: leave Redis alone for REDIS_BACKOFF_MS
    (a sick Redis must not add its timeout to every call), and log at most once per
    FAILURE_LOG_INTERVAL_SECONDS (the caller counts every failure)."""

    def __init__(self) -> None:
        self._skip_until = 0.0
        self._last_log = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def failed(self) -> bool:
        """Starts the back-off; True when this failure is the one to log."""
        now = time.monotonic()
        self._skip_until = now + REDIS_BACKOFF_MS / 1000
        if now - self._last_log < FAILURE_LOG_INTERVAL_SECONDS:
            return False
        self._last_log = now
        return True


class RedisBalanceCache:
    keeps_local_copy: ClassVar[bool] = False

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "credits:",
        timeout_ms: int = REDIS_TIMEOUT_MS_DEFAULT,
        ttl_ms: int = REDIS_SNAPSHOT_TTL_MS,
    ) -> None:
        self.counters = CacheCounters()
        self.namespace = namespace
        self.ttl_ms = ttl_ms
        # A blocking pool: a burst of calls waits (at most the timeout) for one of a bounded
        # number of connections instead of failing over to the database.
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS_MAX,
            timeout=timeout_ms / 1000,
            socket_timeout=timeout_ms / 1000,
            socket_connect_timeout=timeout_ms / 1000,
            decode_responses=True,
        )
        # No retries: retrying would multiply what a slow Redis costs; the database answers.
        self._client = redis_asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._cas = PipelinedScript(self._client, _CAS_SCRIPT)
        self._backoff = RedisBackoff()

    def _available(self) -> bool:
        return self._backoff.available()

    def _failed(self, operation: str, error: Exception) -> None:
        self.counters.errors += 1
        if self._backoff.failed():
            log.warning(
                "redis %s failed (%s: %s); serving from the database",
                operation,
                type(error).__name__,
                error,
                extra={"fields": {"redis_errors_total": self.counters.errors}},
            )

    async def get(
        self, account_id: str, credit_type: str
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        if not self._available():
            return None, None
        try:
            wallet, account = await self._client.mget(
                wallet_key(self.namespace, account_id, credit_type),
                account_key(self.namespace, account_id),
            )
        except Exception as error:  # noqa: BLE001 - any cache failure falls back to the database
            self._failed("read", error)
            return None, None
        # decode_responses=True: the client returns str.
        return (
            None if wallet is None else WalletSnapshot.decode(str(wallet)),
            None if account is None else AccountSnapshot.decode(str(account)),
        )

    def _cas_call(self, key: str, snapshot: Snapshot) -> ScriptCall:
        return [key], [snapshot.version, snapshot.encode(), self.ttl_ms]

    async def _store(self, calls: list[ScriptCall]) -> None:
        """Compare-and-set of each call's snapshot, all in one round trip; counted, and never
        failing the caller."""
        if not calls or not self._available():
            return
        try:
            stored = await self._cas.run(calls)
        except Exception as error:  # noqa: BLE001 - any cache failure falls back to the database
            self._failed("write", error)
            return
        written = sum(1 for s in stored if s)
        self.counters.writes += written
        self.counters.writes_refused_as_older += len(stored) - written

    async def put_wallet(self, account_id: str, credit_type: str, snapshot: WalletSnapshot) -> None:
        await self._store(
            [self._cas_call(wallet_key(self.namespace, account_id, credit_type), snapshot)]
        )

    async def put_account(self, account_id: str, snapshot: AccountSnapshot) -> None:
        await self._store([self._cas_call(account_key(self.namespace, account_id), snapshot)])

    def get_local(
        self, account_id: str, credit_type: str, now_us: int
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        return None, None  # nothing is kept in process

    def put_wallets_local(self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]) -> None:
        pass  # nothing is kept in process

    async def put_wallets_shared(
        self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]
    ) -> None:
        """Many wallets in one round trip (a batch's wallets), each compare-and-set."""
        await self._store(
            [
                self._cas_call(wallet_key(self.namespace, account_id, credit_type), snapshot)
                for account_id, credit_type, snapshot in snapshots
            ]
        )

    async def close(self) -> None:
        await self._cas.close()
        await self._client.aclose()


SnapshotT = TypeVar("SnapshotT", WalletSnapshot, AccountSnapshot)


def _newer(a: SnapshotT | None, b: SnapshotT | None) -> SnapshotT | None:
    if a is None or (b is not None and b.version > a.version):
        return b
    return a


class LayeredBalanceCache:
    """A short-lived in-process copy in front of a shared cache (Redis).

    Reads try the in-process copy first and fill it from the shared cache; writes go to both.
    Both layers compare versions, so neither ever goes back to an older snapshot.
    """

    keeps_local_copy: ClassVar[bool] = True

    def __init__(self, shared: BalanceCache, near_ttl_ms: int) -> None:
        assert 0 < near_ttl_ms <= NEAR_SNAPSHOT_TTL_MS_MAX
        self.shared = shared
        self.near = LocalBalanceCache(ttl_ms=near_ttl_ms)
        self.counters = shared.counters
        self._refresh_ahead_seconds = near_ttl_ms / 1000 * NEAR_REFRESH_AHEAD_SHARE
        # Wallets being read again from Redis behind their readers (refresh_ahead).
        self._refreshing: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def get(
        self, account_id: str, credit_type: str
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        near_wallet, near_account = await self.near.get(account_id, credit_type)
        if near_wallet is not None and near_account is not None:
            self.counters.near_hits += 1
            self._refresh_ahead(account_id, credit_type)
            return near_wallet, near_account
        wallet, account = await self.shared.get(account_id, credit_type)
        # Never older than what this process holds: its own writes reach Redis a moment after
        # they reach the near copy (put_wallets_local, then put_wallets_shared).
        wallet = _newer(near_wallet, wallet)
        account = _newer(near_account, account)
        if wallet is not None:
            await self.near.put_wallet(account_id, credit_type, wallet)
        if account is not None:
            await self.near.put_account(account_id, account)
        return wallet, account

    def get_local(
        self, account_id: str, credit_type: str, now_us: int
    ) -> tuple[WalletSnapshot | None, AccountSnapshot | None]:
        wallet, account = self.near.get_local(account_id, credit_type, now_us)
        if wallet is not None:
            self.counters.near_hits += 1
            self._refresh_ahead(account_id, credit_type)
        return wallet, account

    def _refresh_ahead(self, account_id: str, credit_type: str) -> None:
        """A copy read in the last NEAR_REFRESH_AHEAD_SHARE of its life: read it again from
        Redis in a task of its own, unless one is reading it already (or too many are)."""
        key = (account_id, credit_type)
        if (
            key in self._refreshing
            or len(self._refreshing) >= NEAR_REFRESHES_IN_FLIGHT_MAX
            or not self.near.expires_within(account_id, credit_type, self._refresh_ahead_seconds)
        ):
            return
        task = asyncio.get_running_loop().create_task(self._refresh(key))
        self._refreshing[key] = task
        self.counters.near_refreshes += 1

    async def _refresh(self, key: tuple[str, str]) -> None:
        account_id, credit_type = key
        try:
            wallet, account = await self.shared.get(account_id, credit_type)
            # Only what Redis holds gives a near copy a new life (the near copy refuses it if
            # older than its own): a copy Redis no longer has, or an unreachable Redis, lets it
            # end on time.
            if wallet is not None:
                await self.near.put_wallet(account_id, credit_type, wallet)
            if account is not None:
                await self.near.put_account(account_id, account)
        except Exception:  # the shared cache counts and logs its own failures: a bug
            log.exception("refreshing a near cache copy failed")
        finally:
            self._refreshing.pop(key, None)

    async def put_wallet(self, account_id: str, credit_type: str, snapshot: WalletSnapshot) -> None:
        await self.near.put_wallet(account_id, credit_type, snapshot)
        await self.shared.put_wallet(account_id, credit_type, snapshot)

    async def put_account(self, account_id: str, snapshot: AccountSnapshot) -> None:
        await self.near.put_account(account_id, snapshot)
        await self.shared.put_account(account_id, snapshot)

    def put_wallets_local(self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]) -> None:
        self.near.put_wallets_local(snapshots)

    async def put_wallets_shared(
        self, snapshots: Sequence[tuple[str, str, WalletSnapshot]]
    ) -> None:
        await self.shared.put_wallets_shared(snapshots)

    async def close(self) -> None:
        refreshing = list(self._refreshing.values())
        for task in refreshing:
            task.cancel()
        await asyncio.gather(*refreshing, return_exceptions=True)
        await self.near.close()
        await self.shared.close()
