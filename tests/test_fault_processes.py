"""Faults against real `credits-server` processes: Postgres restarts under load, Redis is
SIGKILLed, the server itself is SIGKILLed in the middle of commits, and two replicas sweep the
same expiring holds and grants at once.

Clients behave as DESIGN.md asks them to: a call that ends UNAVAILABLE or DEADLINE_EXCEEDED is
repeated with the same idempotency key (Reserve) or the same reservation id and amount (Commit)
until it is answered. Every test then proves each logical operation had exactly one effect, from
the journal itself, and ends with a clean journal audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import redis as redis_sync
from conftest import REQUIRE_SERVICES, _migrate_and_audit, assert_audit_clean
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pg_cluster import restartable_cluster
from processes import ServerProcess, free_port, open_channel, spawn_server, wait_serving
from redis import exceptions as redis_exceptions
from rich_errors import error_reason
from sqlalchemy import select

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc
from store.database import create_engine
from store.model import EntryKind, ReservationStatus
from store.schema import grants, journal, reservations

Accounts = Callable[[str], str]
T = TypeVar("T")
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# What a client repeats: the database was unreachable, or the answer did not arrive in time.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_TIMEOUT_SECONDS = 3.0
RETRY_PAUSE_SECONDS = 0.05
# A client gives up on one operation after this long; an outage in these tests lasts seconds.
RETRY_WINDOW_SECONDS = 60.0
# Each wait for a state the test drives the system into is bounded.
STATE_TIMEOUT_SECONDS = 20.0
# Reservations of the spend workloads outlive every test by far, so none expires under them.
SPEND_TTL_SECONDS = 600
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def skip_or_fail(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"CREDITS_REQUIRE_SERVICES=1 but {message}", pytrace=False)
    pytest.skip(message)


# ---- server processes -------------------------------------------------------------------------


class ServerLog:
    """Keeps reading a server's stderr, so a chatty server never blocks on a full pipe and a
    failing test can show what the server said."""

    def __init__(self, server: ServerProcess) -> None:
        self.lines: list[str] = []
        stderr = server.process.stderr
        assert stderr is not None, "spawn_server pipes stderr"
        self._thread = threading.Thread(target=self._read, args=(stderr,), daemon=True)
        self._thread.start()

    def _read(self, stderr: Any) -> None:
        for raw in stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def wait(self, timeout_seconds: float = 5.0) -> None:
        """Until the server closed its stderr (it exited)."""
        self._thread.join(timeout_seconds)

    def errors(self) -> list[str]:
        """ERROR lines: an unexpected failure in a call or a sweeper pass (logged with its
        traceback), never an expected outage (those are WARNING)."""
        return [line for line in self.lines if '"level": "ERROR"' in line]


@contextlib.asynccontextmanager
async def running_servers(
    database_url: str, *extra_args: str, count: int = 1, port: int | None = None
) -> AsyncIterator[list[ServerProcess]]:
    """`count` serving credits-server processes, started together. At the end each is stopped
    with SIGTERM and must exit cleanly, having logged no error."""
    assert port is None or count == 1, "one port, one server"
    servers = [spawn_server(database_url, *extra_args, port=port) for _ in range(count)]
    try:
        await asyncio.gather(*(wait_serving(s.address, s.process) for s in servers))
        logs = [ServerLog(s) for s in servers]
        yield servers
    finally:
        exit_codes = [stop_server(server) for server in servers]
    for log in logs:
        log.wait()
    errors = [line for log in logs for line in log.errors()]
    assert not errors, "a server logged errors:\n" + "\n".join(e[:1500] for e in errors[:3])
    assert exit_codes == [0] * count, f"exit codes after SIGTERM: {exit_codes}"


def stop_server(server: ServerProcess) -> int:
    """SIGTERM, and SIGKILL if it does not exit in time; returns the exit code."""
    if server.process.poll() is not None:
        return server.process.returncode
    try:
        return server.terminate()
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait(10)


# ---- clients that retry -----------------------------------------------------------------------


async def until_answered(call: Callable[[], Awaitable[T]], retries: Counter[str]) -> T:
    """Repeats one request, unchanged, while its status is retryable. Counts the repeats."""
    give_up_at = time.monotonic() + RETRY_WINDOW_SECONDS
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > give_up_at:
                raise
            retries[error.code().name] += 1
        await asyncio.sleep(RETRY_PAUSE_SECONDS)


@dataclass(frozen=True)
class Spend:
    """One logical operation: hold `amount_reserved`, then charge `amount_committed` of it."""

    account: str
    key: str
    amount_reserved: int
    amount_committed: int


@dataclass
class SpendLog:
    """What the clients saw: the reservation id each finished operation got, and how many
    attempts failed with a retryable status."""

    reservation_ids: dict[Spend, str] = field(default_factory=dict)
    # The journal sequence of each operation's COMMIT entry, as its Commit answered.
    commit_sequences: dict[Spend, int] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)


async def spend(stub: Any, op: Spend, log: SpendLog) -> None:
    reserved = await until_answered(
        lambda: stub.Reserve(
            pb.ReserveRequest(
                account_id=op.account,
                amount=op.amount_reserved,
                idempotency_key=op.key,
                ttl_seconds=SPEND_TTL_SECONDS,
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        ),
        log.retries,
    )
    reservation_id = reserved.reservation.reservation_id
    # Commit is idempotent per reservation: the same amount again returns the stored result.
    committed = await until_answered(
        lambda: stub.Commit(
            pb.CommitRequest(
                account_id=op.account, reservation_id=reservation_id, amount=op.amount_committed
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        ),
        log.retries,
    )
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED, committed
    assert committed.reservation.amount_committed == op.amount_committed, committed
    assert committed.entry.kind == pb.ENTRY_KIND_COMMIT, committed
    log.commit_sequences[op] = committed.entry.sequence
    log.reservation_ids[op] = reservation_id


def random_spend(rng: random.Random, account: str, key: str) -> Spend:
    amount_reserved = rng.randint(1, 20)
    return Spend(account, key, amount_reserved, rng.randint(0, amount_reserved))


async def fund(stub: Any, account: str, amount: int) -> None:
    await until_answered(
        lambda: stub.AddCredits(
            pb.AddCreditsRequest(
                account_id=account,
                amount=amount,
                idempotency_key="fund",
                source=pb.GRANT_SOURCE_PURCHASE,
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        ),
        Counter(),
    )


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STATE_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {STATE_TIMEOUT_SECONDS} s: {what}")
        await asyncio.sleep(0.02)


async def health_becomes(channel: grpc.aio.Channel, wanted: int) -> float:
    """Polls grpc.health.v1 Check until it reports `wanted`; returns how long that took."""
    stub = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - started < STATE_TIMEOUT_SECONDS:
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            status = response.status
        except grpc.aio.AioRpcError as error:
            status, seen = -1, [*seen[-4:], error.code().name]
        if status == wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(
        f"health never reported {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)} "
        f"(last errors: {seen})"
    )


# ---- what the journal says --------------------------------------------------------------------


REPEATS_CHECKED = 5


async def assert_repeats_return_the_first_outcome(stub: Any, log: SpendLog) -> None:
    """What a client retrying after a lost answer gets, whether or not the outage happened to
    lose one: Reserve with the same key returns the same reservation, Commit with the same
    amount returns the stored commit, and Commit with another amount names the state."""
    for op, reservation_id in list(log.reservation_ids.items())[:REPEATS_CHECKED]:
        again = await until_answered(
            lambda op=op: stub.Reserve(
                pb.ReserveRequest(
                    account_id=op.account,
                    amount=op.amount_reserved,
                    idempotency_key=op.key,
                    ttl_seconds=SPEND_TTL_SECONDS,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            ),
            Counter(),
        )
        assert again.reservation.reservation_id == reservation_id, op

        def commit(
            amount: int, op: Spend = op, rid: str = reservation_id
        ) -> Callable[[], Awaitable[Any]]:
            request = pb.CommitRequest(account_id=op.account, reservation_id=rid, amount=amount)
            return lambda: stub.Commit(request, timeout=CALL_TIMEOUT_SECONDS)

        committed = await until_answered(commit(op.amount_committed), Counter())
        assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED, op
        assert committed.reservation.amount_committed == op.amount_committed, op
        assert committed.entry.kind == pb.ENTRY_KIND_COMMIT, op
        assert committed.entry.sequence == log.commit_sequences[op], "the stored commit"
        other = op.amount_committed - 1 if op.amount_committed else 1
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await until_answered(commit(other), Counter())
        assert conflict.value.code() == grpc.StatusCode.FAILED_PRECONDITION, op
        assert error_reason(conflict.value) == "RESERVATION_COMMITTED", op


async def assert_each_spend_took_effect_once(
    database_url: str, stub: Any, funded: dict[str, int], log: SpendLog
) -> None:
    """One RESERVE entry per key, one COMMIT entry per reservation, no other entry than the
    funding grants, every reservation committed for its amount, and balances to the credit."""
    done = log.reservation_ids
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            entries = (
                await conn.execute(
                    select(
                        journal.c.account_id,
                        journal.c.kind,
                        journal.c.reservation_id,
                        journal.c.idempotency_key,
                    ).where(journal.c.account_id.in_(list(funded)))
                )
            ).all()
            holds = (
                await conn.execute(
                    select(
                        reservations.c.account_id,
                        reservations.c.idempotency_key,
                        reservations.c.reservation_id,
                        reservations.c.status,
                        reservations.c.amount,
                        reservations.c.amount_committed,
                    ).where(reservations.c.account_id.in_(list(funded)))
                )
            ).all()
    finally:
        await engine.dispose()

    kinds = Counter(e.kind for e in entries)
    assert kinds == {
        EntryKind.GRANT.value: len(funded),
        EntryKind.RESERVE.value: len(done),
        EntryKind.COMMIT.value: len(done),
    }, kinds
    reserve_keys = Counter(
        (e.account_id, e.idempotency_key) for e in entries if e.kind == EntryKind.RESERVE.value
    )
    assert reserve_keys == Counter((op.account, op.key) for op in done), "one RESERVE per key"
    commits = Counter(
        (e.account_id, e.reservation_id) for e in entries if e.kind == EntryKind.COMMIT.value
    )
    assert commits == Counter((op.account, rid) for op, rid in done.items()), (
        "one COMMIT per reservation"
    )
    by_key = {(h.account_id, h.idempotency_key): h for h in holds}
    assert len(holds) == len(by_key) == len(done), "one reservation per key"
    for op, reservation_id in done.items():
        hold = by_key[(op.account, op.key)]
        assert hold.reservation_id == reservation_id, (op, hold)
        assert hold.status == ReservationStatus.COMMITTED.value, (op, hold)
        assert (hold.amount, hold.amount_committed) == (op.amount_reserved, op.amount_committed)

    for account, amount in funded.items():
        spent = sum(op.amount_committed for op in done if op.account == account)
        balance = await until_answered(
            lambda a=account: stub.CheckCredits(
                pb.CheckCreditsRequest(account_id=a, consistent=True),
                timeout=CALL_TIMEOUT_SECONDS,
            ),
            Counter(),
        )
        assert (balance.available, balance.reserved) == (amount - spent, 0), account


# ---- 1: Postgres restarts under load ----------------------------------------------------------

RESTART_WORKERS = 6
# Operations finished before the outage starts and after health is back, so both sides of the
# outage carry load.
SPENDS_AROUND_OUTAGE = 20


async def test_postgres_restart_mid_load_health_flips_and_every_retried_spend_lands_once(
    accounts: Accounts,
) -> None:
    with restartable_cluster() as cluster:
        if cluster is None:
            skip_or_fail("no PostgreSQL server binaries to start a private cluster with")
        assert cluster is not None
        # Migrated, with the suite's test caller, like every database conftest hands out.
        await _migrate_and_audit(cluster.url, check_audit=False)
        async with (
            running_servers(cluster.url, "--migrate") as [server],
            open_channel(server.address) as channel,
        ):
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            funded = {accounts(f"a{i}"): 1_000_000 for i in range(3)}
            for account, amount in funded.items():
                await fund(stub, account, amount)
            log = SpendLog()
            stop = asyncio.Event()

            async def worker(number: int) -> None:
                rng = random.Random(number)
                account = list(funded)[number % len(funded)]
                sequence = 0
                while not stop.is_set():
                    await spend(stub, random_spend(rng, account, f"w{number}-{sequence}"), log)
                    sequence += 1

            workers = [asyncio.create_task(worker(n)) for n in range(RESTART_WORKERS)]
            try:
                await eventually(
                    lambda: len(log.reservation_ids) >= SPENDS_AROUND_OUTAGE, "load before"
                )
                # Immediate: Postgres dies like a crash, mid-transaction, and recovers on start.
                await asyncio.to_thread(cluster.stop, "immediate")
                await health_becomes(channel, NOT_SERVING)
                await asyncio.to_thread(cluster.start)
                await health_becomes(channel, SERVING)
                after = len(log.reservation_ids)
                await eventually(
                    lambda: len(log.reservation_ids) >= after + SPENDS_AROUND_OUTAGE, "load after"
                )
            finally:
                stop.set()
                await asyncio.gather(*workers)
            assert log.retries["UNAVAILABLE"] > 0, "the outage failed some calls"
            await assert_repeats_return_the_first_outcome(stub, log)
            await assert_each_spend_took_effect_once(cluster.url, stub, funded, log)
        await assert_audit_clean(cluster.url, accounts.prefix)  # type: ignore[attr-defined]


# ---- 2: Redis dies under a stream of checks ---------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, so the test can SIGKILL it."""
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not installed")
    assert binary is not None
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis_sync.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + STATE_TIMEOUT_SECONDS
        while True:
            try:
                client.ping()
                break
            except (OSError, redis_exceptions.RedisError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@dataclass(frozen=True)
class CheckSeen:
    account: str
    # The last journal sequence the writer had seen acknowledged when the check was sent.
    sequence_acknowledged: int
    sent_after_kill: bool
    available: int
    reserved: int
    cached: bool


READERS = 4
CHECKS_AROUND_KILL = 150


@pytest.mark.redis
async def test_redis_sigkilled_under_a_stream_of_checks_fails_no_call_and_answers_stay_true(
    postgres_url: str, accounts: Accounts
) -> None:
    with private_redis() as (redis_process, redis_url):
        async with (
            # No near copy: every cached read asks Redis, so the kill is felt at once.
            running_servers(
                postgres_url,
                "--redis-url",
                redis_url,
                "--redis-namespace",
                "fault-test:",
                "--near-cache-ms",
                "0",
            ) as [server],
            open_channel(server.address) as channel,
        ):
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            wallets = [accounts(f"r{i}") for i in range(3)]
            acknowledged: dict[str, int] = {}
            for account in wallets:
                await fund(stub, account, 10_000)
                acknowledged[account] = 1
            seen: list[CheckSeen] = []
            failures: list[str] = []
            killed = asyncio.Event()
            stop = asyncio.Event()

            async def reader(number: int) -> None:
                rng = random.Random(number)
                while not stop.is_set():
                    account = rng.choice(wallets)
                    floor, after_kill = acknowledged[account], killed.is_set()
                    try:
                        r = await stub.CheckCredits(
                            pb.CheckCreditsRequest(account_id=account, amount=5), timeout=5
                        )
                    except grpc.aio.AioRpcError as error:
                        failures.append(f"{error.code().name}: {error.details()}")
                        continue
                    seen.append(
                        CheckSeen(account, floor, after_kill, r.available, r.reserved, r.cached)
                    )

            async def writer() -> None:
                # One writer, one reservation at a time per wallet, every commit at least 1:
                # each (available, reserved) pair names exactly one journal entry.
                rng = random.Random(7)
                for sequence in range(10_000):
                    if stop.is_set():
                        return
                    account = rng.choice(wallets)
                    amount = rng.randint(2, 9)
                    reserved = await stub.Reserve(
                        pb.ReserveRequest(
                            account_id=account, amount=amount, idempotency_key=f"k{sequence}"
                        ),
                        timeout=5,
                    )
                    acknowledged[account] = reserved.entry.sequence
                    committed = await stub.Commit(
                        pb.CommitRequest(
                            account_id=account,
                            reservation_id=reserved.reservation.reservation_id,
                            amount=rng.randint(1, amount),
                        ),
                        timeout=5,
                    )
                    acknowledged[account] = committed.entry.sequence
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(reader(n)) for n in range(READERS)]
            tasks.append(asyncio.create_task(writer()))
            try:
                await eventually(lambda: len(seen) >= CHECKS_AROUND_KILL, "checks before")
                redis_process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(redis_process.wait, 10)
                killed.set()
                before = len(seen)
                await eventually(lambda: len(seen) >= before + CHECKS_AROUND_KILL, "checks after")
            finally:
                stop.set()
                await asyncio.gather(*tasks)

            assert not failures, f"{len(failures)} failed checks, e.g. {failures[:3]}"
            await assert_checks_match_the_journal(postgres_url, seen)
            assert any(s.cached for s in seen if not s.sent_after_kill), "Redis served before"
            assert not any(s.cached for s in seen if s.sent_after_kill), "no Redis after"
    await assert_audit_clean(postgres_url, accounts.prefix)  # type: ignore[attr-defined]


async def assert_checks_match_the_journal(database_url: str, seen: list[CheckSeen]) -> None:
    """Every answer is a state its wallet was really in; an answer read from the database is
    at least as new as the last change acknowledged before the check was sent."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        journal.c.account_id,
                        journal.c.sequence,
                        journal.c.available_after,
                        journal.c.reserved_after,
                    ).where(journal.c.account_id.in_({s.account for s in seen}))
                )
            ).all()
    finally:
        await engine.dispose()
    sequence_of = {(r.account_id, r.available_after, r.reserved_after): r.sequence for r in rows}
    assert len(sequence_of) == len(rows), "each state of a wallet is distinct"
    wrong = []
    for s in seen:
        sequence = sequence_of.get((s.account, s.available, s.reserved))
        if sequence is None or (not s.cached and sequence < s.sequence_acknowledged):
            wrong.append(f"{s} is journal entry #{sequence}")
    assert not wrong, f"{len(wrong)} of {len(seen)} answers untrue, e.g. {wrong[:3]}"


# ---- 3: the server is SIGKILLed in the middle of commits --------------------------------------

KILLED_SPENDS = 150
COMMITS_BEFORE_KILL = 20
# Spends in flight at once. All 150 at once, the server's batches could settle every one of them
# between two looks for the 20th (a look every 20 ms), and the kill then came after the last.
# Five at a time leave some 26 rounds of Reserve and Commit to go when the kill comes, with
# calls in flight to fail.
KILLED_SPENDS_IN_FLIGHT = 5


async def test_server_sigkilled_mid_commits_then_restarted_every_retried_spend_lands_once(
    postgres_url: str, accounts: Accounts
) -> None:
    port = free_port()
    first = spawn_server(postgres_url, port=port)
    try:
        await wait_serving(first.address, first.process)
        ServerLog(first)  # drains its stderr until the kill
        async with open_channel(first.address) as channel:
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            funded = {accounts(f"k{i}"): 100_000 for i in range(3)}
            for account, amount in funded.items():
                await fund(stub, account, amount)
            rng = random.Random(3)
            wallets = list(funded)
            ops = [random_spend(rng, wallets[i % 3], f"op-{i}") for i in range(KILLED_SPENDS)]
            log = SpendLog()
            in_flight = asyncio.Semaphore(KILLED_SPENDS_IN_FLIGHT)

            async def paced(op: Spend) -> None:
                async with in_flight:
                    await spend(stub, op, log)

            spends = [asyncio.create_task(paced(op)) for op in ops]
            try:
                await eventually(
                    lambda: len(log.reservation_ids) >= COMMITS_BEFORE_KILL, "commits before"
                )
                first.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(first.process.wait, 10)
                committed_at_kill = len(log.reservation_ids)
                # Same port: the clients' channel finds the new process where the old one was.
                async with running_servers(postgres_url, port=port):
                    await asyncio.gather(*spends)
                    assert 0 < committed_at_kill < KILLED_SPENDS, committed_at_kill
                    assert log.retries["UNAVAILABLE"] > 0, "the kill failed some calls"
                    await assert_repeats_return_the_first_outcome(stub, log)
                    await assert_each_spend_took_effect_once(postgres_url, stub, funded, log)
            finally:
                for task in spends:
                    task.cancel()
                await asyncio.gather(*spends, return_exceptions=True)
    finally:
        stop_server(first)
    await assert_audit_clean(postgres_url, accounts.prefix)  # type: ignore[attr-defined]


# ---- 4: two replicas sweep the same expiring holds and grants ---------------------------------

SWEEP_WALLETS = 10
DURABLE_CREDITS = 100
# Two grants that expire a moment after they are made, and holds that expire before and after
# them. The holds pin at most 30 of the first grant's 40 (burn-down takes the earliest-expiring
# first), so both grants still have credits left to expire when their time comes.
EXPIRING_GRANTS = ((40, 1.5), (40, 2.0))  # (amount, seconds until it expires)
HOLDS = ((4, 1),) * 5 + ((5, 3),) * 2  # (amount, ttl_seconds)


def timestamp_in(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(int((time.time() + seconds) * 1_000_000))
    return stamp


async def test_two_replicas_sweeping_every_50ms_expire_each_hold_and_grant_exactly_once(
    postgres_url: str, accounts: Accounts
) -> None:
    sweep = ("--sweep-interval-seconds", "0.05")
    async with (
        running_servers(postgres_url, *sweep, count=2) as [one, two],
        open_channel(one.address) as channel_one,
        open_channel(two.address) as channel_two,
    ):
        stubs = [credits_pb2_grpc.CreditsServiceStub(c) for c in (channel_one, channel_two)]
        wallets = [accounts(f"s{i}") for i in range(SWEEP_WALLETS)]

        async def set_up(number: int, account: str) -> tuple[list[str], list[str]]:
            stub = stubs[number % 2]
            await fund(stub, account, DURABLE_CREDITS)
            expiring = []
            for i, (amount, seconds) in enumerate(EXPIRING_GRANTS):
                added = await stub.AddCredits(
                    pb.AddCreditsRequest(
                        account_id=account,
                        amount=amount,
                        idempotency_key=f"expiring-{i}",
                        source=pb.GRANT_SOURCE_PROMOTION,
                        expires_at=timestamp_in(seconds),
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                expiring.append(added.grant.grant_id)
            holds = []
            for i, (amount, ttl_seconds) in enumerate(HOLDS):
                reserved = await stubs[(number + i) % 2].Reserve(
                    pb.ReserveRequest(
                        account_id=account,
                        amount=amount,
                        idempotency_key=f"hold-{i}",
                        ttl_seconds=ttl_seconds,
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                holds.append(reserved.reservation.reservation_id)
            return expiring, holds

        made = await asyncio.gather(*(set_up(n, a) for n, a in enumerate(wallets)))
        expiring_ids = {g for grant_ids, _ in made for g in grant_ids}
        hold_ids = {r for _, reservation_ids in made for r in reservation_ids}
        engine = create_engine(postgres_url)
        try:

            async def settled() -> bool:
                async with engine.connect() as conn:
                    pending = await conn.scalar(
                        select(reservations.c.reservation_id)
                        .where(
                            reservations.c.reservation_id.in_(hold_ids),
                            reservations.c.status == ReservationStatus.PENDING.value,
                        )
                        .limit(1)
                    )
                    unexpired = await conn.scalar(
                        select(grants.c.grant_id)
                        .where(
                            grants.c.grant_id.in_(expiring_ids), grants.c.expired < grants.c.amount
                        )
                        .limit(1)
                    )
                return pending is None and unexpired is None

            deadline = time.monotonic() + STATE_TIMEOUT_SECONDS
            while not await settled():
                assert time.monotonic() < deadline, "the sweepers did not finish"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # more passes of both sweepers over the settled wallets
            async with engine.connect() as conn:
                entries = (
                    await conn.execute(
                        select(
                            journal.c.account_id,
                            journal.c.kind,
                            journal.c.grant_id,
                            journal.c.reservation_id,
                            journal.c.principal,
                        ).where(journal.c.account_id.in_(wallets))
                    )
                ).all()
                holds = (
                    await conn.execute(
                        select(reservations).where(reservations.c.account_id.in_(wallets))
                    )
                ).all()
        finally:
            await engine.dispose()

        kinds = Counter(e.kind for e in entries)
        assert kinds == {
            EntryKind.GRANT.value: SWEEP_WALLETS * (1 + len(EXPIRING_GRANTS)),
            EntryKind.RESERVE.value: SWEEP_WALLETS * len(HOLDS),
            EntryKind.HOLD_EXPIRY.value: SWEEP_WALLETS * len(HOLDS),
            EntryKind.GRANT_EXPIRY.value: SWEEP_WALLETS * len(EXPIRING_GRANTS),
        }, kinds
        hold_expiries = Counter(
            e.reservation_id for e in entries if e.kind == EntryKind.HOLD_EXPIRY.value
        )
        assert hold_expiries == Counter(hold_ids), "each hold expired exactly once"
        grant_expiries = Counter(
            e.grant_id for e in entries if e.kind == EntryKind.GRANT_EXPIRY.value
        )
        assert grant_expiries == Counter(expiring_ids), "each grant's expiry journaled once"
        assert {e.principal for e in entries if "expiry" in e.kind} == {"system"}
        for hold in holds:
            assert hold.status == ReservationStatus.EXPIRED.value, hold
            assert (hold.amount_expired, hold.amount_committed) == (hold.amount, 0), hold
        for account in wallets:
            balance = await stubs[0].CheckCredits(
                pb.CheckCreditsRequest(account_id=account, consistent=True)
            )
            assert (balance.available, balance.reserved) == (DURABLE_CREDITS, 0), account
    await assert_audit_clean(postgres_url, accounts.prefix)  # type: ignore[attr-defined]
