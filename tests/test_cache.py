"""The balance cache: fast copies that never outrank the database (DESIGN.md invariant 5)."""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from conftest import delete_redis_namespace, hanging_redis, new_redis_namespace

from credits.v1 import credits_pb2 as pb
from store import limits
from store.audit import audit
from store.cache import (
    NEAR_SNAPSHOT_TTL_MS_DEFAULT,
    AccountSnapshot,
    BalanceCache,
    LayeredBalanceCache,
    LocalBalanceCache,
    RedisBalanceCache,
    WalletSnapshot,
    wallet_key,
)
from store.clock import ManualClock
from store.database import create_engine
from store.ledger import Ledger
from store.model import (
    AccountStatus,
    AddCreditsCommand,
    Caller,
    CommitCommand,
    GrantSource,
    ReserveCommand,
)

Accounts = Callable[[str], str]
pytestmark = pytest.mark.redis
CALLER = Caller()


@pytest.fixture(params=["redis", "local", "layered"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[BalanceCache]:
    if request.param == "local":
        yield LocalBalanceCache()
        return
    url = request.getfixturevalue("redis_url")
    namespace = new_redis_namespace()
    redis_cache: BalanceCache = RedisBalanceCache(url, namespace=namespace, timeout_ms=1000)
    if request.param == "layered":
        redis_cache = LayeredBalanceCache(redis_cache, NEAR_SNAPSHOT_TTL_MS_DEFAULT)
    yield redis_cache
    await redis_cache.close()
    await delete_redis_namespace(url, namespace)


async def test_a_write_through_another_replica_is_seen_within_the_near_ttl(
    redis_url: str,
) -> None:
    """Two replicas share Redis; each keeps a near copy for 300 ms. Its own writes show at once,
    the other's once its copy ages out, never later."""
    namespace = new_redis_namespace()
    near_ttl_ms = 300
    a, b = (
        LayeredBalanceCache(RedisBalanceCache(redis_url, namespace=namespace), near_ttl_ms)
        for _ in range(2)
    )
    try:
        account = AccountSnapshot(version=0, status=AccountStatus.ACTIVE)
        for replica in (a, b):
            await replica.put_account("acct", account)

        def snapshot(version: int) -> WalletSnapshot:
            return WalletSnapshot(version, 100 - version, version, 2**62, 1)

        await a.put_wallet("acct", "default", snapshot(1))
        assert (await b.get("acct", "default"))[0] == snapshot(1)  # filled from Redis
        await a.put_wallet("acct", "default", snapshot(2))
        assert (await a.get("acct", "default"))[0] == snapshot(2)  # own write: at once
        assert (await b.get("acct", "default"))[0] == snapshot(1)  # b's copy is still young
        await asyncio.sleep(near_ttl_ms / 1000 + 0.05)
        assert (await b.get("acct", "default"))[0] == snapshot(2)
        assert b.counters.near_hits >= 1
        # An older snapshot never replaces a newer one in the near copy either.
        await b.put_wallet("acct", "default", snapshot(1))
        assert (await b.get("acct", "default"))[0] == snapshot(2)
    finally:
        await a.close()
        await b.close()
        await delete_redis_namespace(redis_url, namespace)


@pytest.fixture
async def two_replicas(redis_url: str) -> AsyncIterator[tuple[LayeredBalanceCache, ...]]:
    """Two replicas' caches on one Redis namespace, near copies living NEAR_TTL_MS, both
    holding an active account "acct"."""
    namespace = new_redis_namespace()
    replicas = tuple(
        LayeredBalanceCache(RedisBalanceCache(redis_url, namespace=namespace), NEAR_TTL_MS)
        for _ in range(2)
    )
    try:
        for replica in replicas:
            await replica.put_account("acct", AccountSnapshot(0, AccountStatus.ACTIVE))
        yield replicas
    finally:
        for replica in replicas:
            await replica.close()
        await delete_redis_namespace(redis_url, namespace)


NEAR_TTL_MS = 200


def wallet_at(version: int) -> WalletSnapshot:
    return WalletSnapshot(version, 100 - version, version, 2**62, 1)


async def test_a_near_copy_read_all_the_time_never_expires_and_still_follows_other_replicas(
    two_replicas: tuple[LayeredBalanceCache, ...],
) -> None:
    """Read in the last quarter of its life, a near copy is read again from Redis behind the
    reader: a wallet read every 10 ms is always answered in process (without it, every reader
    in the moment after each expiry waited for Redis), and another replica's write still shows
    within one near life."""
    a, b = two_replicas
    await a.put_wallet("acct", "default", wallet_at(1))
    await b.get("acct", "default")  # b's near copy, from Redis
    started = time.monotonic()
    written_at = None
    seen: list[tuple[float, int]] = []
    misses = 0
    while (now := time.monotonic() - started) < 3 * NEAR_TTL_MS / 1000:
        wallet, _ = b.get_local("acct", "default", 1)
        if wallet is None:
            misses += 1
        else:
            seen.append((now, wallet.version))
        if written_at is None and now > 1.2 * NEAR_TTL_MS / 1000:
            await a.put_wallet("acct", "default", wallet_at(2))
            written_at = now
        await asyncio.sleep(0.01)
    assert misses == 0
    assert written_at is not None
    first_seen = min(t for t, version in seen if version == 2)
    assert first_seen - written_at <= NEAR_TTL_MS / 1000 + 0.05
    assert b.counters.near_refreshes >= 3


async def test_a_near_copy_redis_no_longer_holds_ends_on_time_however_often_it_is_read(
    two_replicas: tuple[LayeredBalanceCache, ...], redis_url: str
) -> None:
    """Only what Redis holds gives a near copy a new life: a copy read all the time ends within
    one near life of Redis forgetting it, so the staleness bound holds."""
    _, b = two_replicas
    await b.put_wallet("acct", "default", wallet_at(1))
    for _ in range(20):  # refreshed ahead a few times while Redis holds it
        assert b.get_local("acct", "default", 1)[0] == wallet_at(1)
        await asyncio.sleep(0.02)
    assert b.counters.near_refreshes >= 1
    shared = b.shared
    assert isinstance(shared, RedisBalanceCache)
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        assert await client.delete(wallet_key(shared.namespace, "acct", "default")) == 1
    finally:
        await client.aclose()
    gone_at = time.monotonic()
    while b.get_local("acct", "default", 1)[0] is not None:
        assert time.monotonic() - gone_at <= NEAR_TTL_MS / 1000 + 0.05
        await asyncio.sleep(0.01)


async def test_a_near_copy_is_read_again_once_however_many_read_it_at_once(
    two_replicas: tuple[LayeredBalanceCache, ...],
) -> None:
    _, b = two_replicas
    await b.put_wallet("acct", "default", wallet_at(1))
    assert b.get_local("acct", "default", 1)[0] == wallet_at(1)
    assert b.counters.near_refreshes == 0  # young: nothing to read again
    await asyncio.sleep(0.8 * NEAR_TTL_MS / 1000)
    for _ in range(100):
        assert b.get_local("acct", "default", 1)[0] == wallet_at(1)
    assert b.counters.near_refreshes == 1
    await asyncio.sleep(0.05)  # the one read came back and gave the copy a new life
    assert not b.near.expires_within("acct", "default", 0.5 * NEAR_TTL_MS / 1000)


@pytest.fixture
async def cached_ledger(
    database_url: str, clock: ManualClock, cache: BalanceCache, accounts: Accounts
) -> AsyncIterator[Ledger]:
    engine = create_engine(database_url)
    try:
        ledger = Ledger(engine, clock, cache=cache)
        yield ledger
        await ledger.close()
        report = await audit(engine, accounts.prefix)  # type: ignore[attr-defined]
        assert report.clean, "\n".join(map(str, report.mismatches))
    finally:
        await engine.dispose()


async def grant(ledger: Ledger, account: str, amount: int, key: str, **kw: Any) -> None:
    await ledger.add_credits(
        AddCreditsCommand(account, "default", amount, key, GrantSource.PURCHASE, **kw), CALLER
    )


async def test_snapshots_held_in_process_are_out_of_the_collectors_sight() -> None:
    """Every cached wallet adds nothing for a full collection to walk: its entry is a plain
    tuple, which the collector stops tracking once it has seen it. Entries that were objects
    made full collections pause for 14 ms at 10,000 wallets (docs/performance.md, lever 13)."""
    local = LocalBalanceCache()
    wallets = {f"gc{i}": WalletSnapshot(i, i * 10, i, 2**62, 7) for i in range(1_000)}
    local.put_wallets_local([(account, "default", w) for account, w in wallets.items()])
    for i, account in enumerate(wallets):
        status = AccountStatus.LOCKED if i % 2 else AccountStatus.ACTIVE
        await local.put_account(account, AccountSnapshot(i, status))
    gc.collect()
    tracked = [entry for entry in local._entries.items() if gc.is_tracked(entry[1])]
    assert tracked == [], tracked[:3]
    assert not any(gc.is_tracked(key) for key in local._entries)
    # Still served as snapshots, exactly as put.
    for i, (account, wallet) in enumerate(wallets.items()):
        status = AccountStatus.LOCKED if i % 2 else AccountStatus.ACTIVE
        assert await local.get(account, "default") == (wallet, AccountSnapshot(i, status))


async def test_expired_snapshots_held_in_process_are_dropped_as_others_arrive() -> None:
    """The near copy in front of Redis lives 100 ms: what it holds stays about what was touched
    in the last 100 ms, not every wallet touched since the start (up to the bound)."""
    local = LocalBalanceCache(ttl_ms=20)
    local.put_wallets_local(
        [(f"old{i}", "default", WalletSnapshot(1, 1, 0, 2**62, 1)) for i in range(500)]
    )
    assert len(local._entries) == 500
    await asyncio.sleep(0.05)
    await local.put_wallet("new", "default", WalletSnapshot(1, 1, 0, 2**62, 1))
    assert list(local._entries) == [("w", "new", "default")]


async def test_an_older_snapshot_never_replaces_a_newer_one(cache: BalanceCache) -> None:
    versions = list(range(1, 201))
    random.Random(7).shuffle(versions)
    await asyncio.gather(
        *(
            cache.put_wallet("acct", "default", WalletSnapshot(v, v * 10, 0, 2**62, v))
            for v in versions
        )
    )
    wallet, _ = await cache.get("acct", "default")
    assert wallet == WalletSnapshot(200, 2000, 0, 2**62, 200)
    await cache.put_wallet("acct", "default", WalletSnapshot(199, 1, 1, 2**62, 1))
    assert (await cache.get("acct", "default"))[0] == wallet
    assert cache.counters.writes_refused_as_older >= 1


async def test_concurrent_spending_leaves_the_cache_equal_to_the_database(
    cached_ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 1000, "g")

    async def spend(i: int) -> None:
        result = await cached_ledger.reserve(ReserveCommand(a, "default", 7, f"r{i}"), CALLER)
        if i % 3:
            await cached_ledger.commit(
                CommitCommand(a, result.reservation.reservation_id, i % 7), CALLER
            )

    await asyncio.gather(*(spend(i) for i in range(60)))
    cached = await cached_ledger.check(a, "default")
    fresh = await cached_ledger.check(a, "default", consistent=True)
    assert cached.from_cache and not fresh.from_cache
    assert (cached.available, cached.reserved) == (fresh.available, fresh.reserved)


async def test_a_change_refreshes_the_snapshot_so_the_next_check_is_a_current_hit(
    cached_ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 100, "g")
    await cached_ledger.reserve(ReserveCommand(a, "default", 30, "r"), CALLER)
    balance = await cached_ledger.check(a, "default")
    assert balance.from_cache
    assert (balance.available, balance.reserved) == (70, 30)


async def test_a_sweep_refreshes_the_snapshot(
    cached_ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 100, "g")
    await cached_ledger.reserve(ReserveCommand(a, "default", 30, "r", ttl_seconds=5), CALLER)
    clock.advance_seconds(6)
    while await cached_ledger.sweep_expired_holds():
        pass
    balance = await cached_ledger.check(a, "default")
    assert balance.from_cache, "the sweep wrote a fresh snapshot"
    assert (balance.available, balance.reserved) == (100, 0)


async def test_a_snapshot_is_not_served_once_a_grant_expires(
    cached_ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 50, "g", expires_at_us=clock.now_us() + 60 * 1_000_000)
    assert (await cached_ledger.check(a, "default")).available == 50
    clock.advance_seconds(60)  # no write happens: only time passes
    balance = await cached_ledger.check(a, "default")
    assert not balance.from_cache
    assert balance.available == 0


async def test_a_future_grant_becomes_visible_when_it_takes_effect(
    cached_ledger: Ledger, accounts: Accounts, clock: ManualClock
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 50, "g", effective_at_us=clock.now_us() + 30 * 1_000_000)
    assert (await cached_ledger.check(a, "default")).available == 0
    clock.advance_seconds(30)
    assert (await cached_ledger.check(a, "default")).available == 50


async def test_locking_an_account_reaches_the_cache(
    cached_ledger: Ledger, accounts: Accounts
) -> None:
    a = accounts("a")
    await grant(cached_ledger, a, 50, "g")
    assert (await cached_ledger.check(a, "default")).account_status is AccountStatus.ACTIVE
    await cached_ledger.set_account_status(a, AccountStatus.LOCKED)
    assert (await cached_ledger.check(a, "default")).account_status is AccountStatus.LOCKED
    unknown = accounts("never-granted")
    assert (await cached_ledger.check(unknown, "default")).account_status is AccountStatus.ACTIVE
    await cached_ledger.set_account_status(unknown, AccountStatus.LOCKED)
    assert (await cached_ledger.check(unknown, "default")).account_status is AccountStatus.LOCKED


@pytest.mark.slow
@pytest.mark.parametrize("near_cache_ms", [0, NEAR_SNAPSHOT_TTL_MS_DEFAULT])
async def test_redis_killed_mid_run_check_keeps_answering_from_the_database(
    start_server: Any,
    database_url: str,
    accounts: Accounts,
    private_redis: Any,
    near_cache_ms: int,
) -> None:
    """Without a near copy every read after the kill comes from the database; with one, reads
    may come from it, and they are just as right (this replica's writes update it)."""
    process, url = private_redis
    for _ in range(50):  # wait for the private server to accept connections
        try:
            probe = RedisBalanceCache(url, timeout_ms=200)
            await probe._client.ping()
            await probe.close()
            break
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.1)
    server = await start_server(database_url, redis_url=url, near_cache_ms=near_cache_ms)
    account = accounts("a")
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=100, idempotency_key="g", source=pb.GRANT_SOURCE_PURCHASE
        )
    )
    first = await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, amount=5))
    assert first.cached and first.allowed
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    expected_available = 100
    for i in range(30):
        response = await server.stub.CheckCredits(
            pb.CheckCreditsRequest(account_id=account, amount=5), timeout=5
        )
        assert not response.cached or near_cache_ms > 0
        assert (response.available, response.allowed) == (expected_available, True)
        if i == 10:  # writes keep working too, and the reads see them
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=account, amount=40, idempotency_key="r")
            )
            expected_available = 60
    final = await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account))
    assert (final.available, final.reserved) == (60, 40)
    assert server.app.cache.counters.errors >= 1


async def test_check_reports_whether_it_came_from_the_cache(
    start_server: Any, sqlite_url: str, accounts: Accounts
) -> None:
    server = await start_server(sqlite_url)  # no Redis: the in-process cache serves
    account = accounts("a")
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=10, idempotency_key="g", source=pb.GRANT_SOURCE_PURCHASE
        )
    )
    assert (await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account))).cached
    consistent = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert not consistent.cached and consistent.available == 10


def test_the_cache_ttls_are_bounded() -> None:
    from store import cache as cache_module

    assert 0 < cache_module.LOCAL_SNAPSHOT_TTL_MS <= 60_000
    assert 0 < cache_module.REDIS_SNAPSHOT_TTL_MS <= 3_600_000
    assert limits.HOLD_TTL_SECONDS_MIN >= 1


@pytest.mark.redis
async def test_batched_snapshot_writes_survive_redis_forgetting_its_scripts(redis_url: str) -> None:
    """Redis restarted or flushed: EVALSHA answers NOSCRIPT, runs nothing, and the calls are
    sent again once the script is loaded; stale ones are still refused."""
    namespace = new_redis_namespace()
    cache = RedisBalanceCache(redis_url, namespace=namespace)
    admin = redis_asyncio.Redis.from_url(redis_url)
    try:
        account = AccountSnapshot(version=0, status=AccountStatus.ACTIVE)
        await cache.put_account("acct", account)

        def snapshot(version: int) -> WalletSnapshot:
            return WalletSnapshot(version, 100 - version, version, 2**62, 1)

        await cache.put_wallets_shared(
            [("acct", "default", snapshot(1)), ("b", "default", snapshot(1))]
        )
        await admin.script_flush()
        await cache.put_wallets_shared(
            [("acct", "default", snapshot(3)), ("b", "default", snapshot(2))]
        )
        await admin.script_flush()
        await cache.put_wallets_shared([("acct", "default", snapshot(2))])  # older: refused
        assert (await cache.get("acct", "default"))[0] == snapshot(3)
        assert (await cache.get("b", "default"))[0] == snapshot(2)
        assert cache.counters.writes_refused_as_older == 1
        assert cache.counters.errors == 0
    finally:
        await cache.close()
        await admin.aclose()
        await delete_redis_namespace(redis_url, namespace)


async def test_a_hanging_redis_holds_a_snapshot_write_at_most_the_timeout() -> None:
    """Snapshot writes bound their whole round trip (not each socket operation): a Redis that
    accepts and never answers costs the write its timeout, counted as an error, no more."""

    async with hanging_redis() as url:
        cache = RedisBalanceCache(url, timeout_ms=100)
        try:
            started = time.monotonic()
            await cache.put_wallet("user:hang", "default", WalletSnapshot(1, 10, 0, 2**62, 1))
            elapsed_ms = (time.monotonic() - started) * 1000
        finally:
            await cache.close()
    assert cache.counters.errors == 1
    assert 100 <= elapsed_ms < 500
