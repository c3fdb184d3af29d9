"""Group commit: concurrent calls of one kind share a Postgres commit.

A batcher queues calls; each batch commits once for all of its calls (one fsync): by default
in one transaction (`settle`, whose `decide` the subclass writes); Reserve settles its batches
otherwise (store/reserve_batch.py). A batch takes whatever queued while the previous one ran,
so an idle server answers a lone call at once and a busy one puts more calls in each commit
(one batch at a time makes the biggest batches, and CPU per call falls as they grow). Only a
saturated server (its event loop's thread on the CPU nearly all the time, store/loop_load.py,
after a batch of BATCH_FILL_AFTER_CALLS or more) lets the next batch wait a few milliseconds to
fill: there every call waits in gRPC's queues anyway, and the CPU a bigger batch saves is what
limits throughput. A second batch starts only beside one that has run for BATCH_STALL_SECONDS
(waiting on a wallet another transaction holds, say), so one slow wallet never holds up everyone
else.

Whatever a batch does not settle (its subclass leaves the call out of `decided`), and every
call of a batch that failed before committing it, goes back to its caller as None: the
one-call path in ledger.py then settles it, and that path's idempotency (keys, resolution
sequences) makes a batch that died before, during or after COMMIT safe to retry.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from store import limits
from store.batch_pool import BatchConnections
from store.cache import WalletSnapshot
from store.clock import Clock
from store.errors import LedgerError
from store.histogram import Histogram
from store.loop_load import LoopLoad
from store.wallet_copies import WalletCopies, WalletCopy, WalletKey

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
OutcomeT = TypeVar("OutcomeT")
# A published snapshot: (account_id, credit_type, snapshot).
Published = tuple[str, str, WalletSnapshot]


@dataclass
class Written:
    """What a batch wrote, true once it commits: the wallet snapshots to publish, and the copies
    of the wallets to decide the next Reserve batches on (store/wallet_copies.py)."""

    published: list[Published] = field(default_factory=list)
    copies: list[tuple[WalletKey, WalletCopy]] = field(default_factory=list)

    @classmethod
    def of(cls, copies: Iterable[tuple[WalletKey, WalletCopy]], now_us: int) -> Written:
        """What a batch that left these wallets so, decided at `now_us`, wrote."""
        kept = list(copies)
        return cls([(a, c, copy.snapshot(now_us)) for (a, c), copy in kept], kept)

    def extend(self, other: Written) -> None:
        self.published.extend(other.published)
        self.copies.extend(other.copies)


@dataclass(frozen=True)
class Publish:
    """Puts a batch's wallet snapshots into the balance cache after COMMIT, in two halves:
    this process's copy before the batch's callers are answered (a caller's next cached read
    here sees its own change), the shared copy (Redis) after, so that its round trip is not
    in their latency. Another replica's cached reads may lag that much longer; they may lag
    by the near cache's lifetime anyway (--near-cache-ms)."""

    local: Callable[[Sequence[Published]], None]
    shared: Callable[[Sequence[Published]], Awaitable[None]]
    # The process keeps no copy of its own (Redis without the near cache): its cached reads come
    # from the shared copy, so that is written before the callers are answered.
    shared_first: bool = False


@dataclass(frozen=True)
class AdmissionCall:
    """What a rate check needs to know of a call (the fields of its request it reads)."""

    principal: str
    method: str
    account_id: str
    amount: int


# Decides, for a batch's calls at once, which may go ahead (None) and which are refused (the
# error their callers get). The server's rate limits: checked per batch, one Redis round trip.
Admission = Callable[[Sequence[AdmissionCall]], Awaitable[Sequence[LedgerError | None]]]


@dataclass
class Waiting(Generic[RequestT, OutcomeT]):
    request: RequestT
    arrival: int
    future: asyncio.Future[OutcomeT | None]
    # The loop's clock when the call was queued (queue_seconds).
    queued_at: float = 0.0


class Admitting(Generic[RequestT, OutcomeT]):
    """A batch's rate check, run once: in a task of its own beside the batch's first round trip
    to Postgres when the batch has one to overlap (`start`), else in the batch's own task when
    the batch asks for the result (a task there would only add two trips round the event loop
    before the batch's write)."""

    def __init__(
        self,
        admit: Callable[
            [list[Waiting[RequestT, OutcomeT]]], Awaitable[list[Waiting[RequestT, OutcomeT]]]
        ],
        batch: list[Waiting[RequestT, OutcomeT]],
    ) -> None:
        self._admit = admit
        self._batch = batch
        self._task: asyncio.Future[list[Waiting[RequestT, OutcomeT]]] | None = None
        self._admitted: list[Waiting[RequestT, OutcomeT]] | None = None

    def start(self) -> None:
        """Runs the check beside whatever the batch awaits next."""
        if self._task is None and self._admitted is None:
            self._task = asyncio.ensure_future(self._admit(self._batch))

    async def result(self) -> list[Waiting[RequestT, OutcomeT]]:
        """The calls the check let through (it answered the others); checks once, however
        often asked (the batch asks, and its failure path asks again)."""
        if self._task is not None:
            return await self._task
        if self._admitted is None:
            self._admitted = await self._admit(self._batch)
        return self._admitted


@dataclass
class Settled(Generic[OutcomeT]):
    """What a batch has committed: each settled call's outcome (by arrival) and the wallet
    snapshots to publish. Only what is on disk goes in, so a batch that fails half-way still
    answers from what it committed and hands only the rest back."""

    outcomes: dict[int, OutcomeT] = field(default_factory=dict)
    written: Written = field(default_factory=Written)

    def add(self, outcomes: dict[int, OutcomeT], written: Written) -> None:
        self.outcomes.update(outcomes)
        self.written.extend(written)


@dataclass
class BatchCounters:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    # Batches whose transaction failed; their requests went the one-call path.
    failed_batches: int = 0
    # Requests sent to the one-call path: what a batch does not decide, and failed batches.
    handed_back: int = 0
    # Batches that wrote without locks and found a wallet moved or held since their read (or
    # a key taken): those calls went the batch's locking path.
    lost_compare_and_set: int = 0
    # Batches that waited to fill because the server was saturated.
    filled: int = 0


class Batcher(ABC, Generic[RequestT, OutcomeT]):
    def __init__(
        self,
        connections: BatchConnections,
        clock: Clock,
        publish: Publish,
        *,
        admission: Admission | None = None,
        copies: WalletCopies | None = None,
        batch_max: int = limits.BATCH_MAX,
        batches_in_flight_max: int = limits.BATCHES_IN_FLIGHT_MAX,
        fill_wait_seconds: float = limits.BATCH_FILL_WAIT_MS_DEFAULT / 1000,
    ) -> None:
        self.connections = connections
        self.admission = admission
        self.clock = clock
        self.publish = publish
        # The Reserve batches' copies of wallets, which every batch's writes refresh.
        self.copies = copies if copies is not None else WalletCopies()
        self.batch_max = batch_max
        self.batches_in_flight_max = batches_in_flight_max
        self.counters = BatchCounters()
        # Where a batched call's time goes: waiting in the queue for its batch to start, then
        # its batch, from start to commit (the two metrics tell a queue from a slow database).
        self.queue_seconds = Histogram()
        self.batch_seconds = Histogram()
        self._queue: list[Waiting[RequestT, OutcomeT]] = []
        self._arrivals = 0
        # Batches in their transaction, and when each started (the ones that count against
        # batches_in_flight_max); every batch task until it ends, publishing included.
        self._tasks: dict[asyncio.Task[None], float] = {}
        self._live: set[asyncio.Task[None]] = set()
        self._recheck: asyncio.TimerHandle | None = None
        self.fill_wait_seconds = fill_wait_seconds
        self._loop_load = LoopLoad()
        # While a batch waits to fill (the server is saturated): when it starts at the latest.
        self._filling_until: float | None = None
        self._last_batch_size = 0

    async def submit(self, request: RequestT) -> OutcomeT | None:
        """The outcome decided in a batch, or None: take the one-call path."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OutcomeT | None] = loop.create_future()
        self._arrivals += 1
        self._queue.append(Waiting(request, self._arrivals, future, loop.time()))
        self._start_batches()
        return await future

    async def close(self) -> None:
        """Waits for the batches in flight (their callers are waiting for them)."""
        # Whatever waits to fill starts now.
        self.fill_wait_seconds = 0
        if self._filling_until is not None:
            self._filling_until = None
            self._reschedule()
        while self._live or self._queue:
            await asyncio.gather(*self._live, return_exceptions=True)
            if not self._live and self._queue:
                self._start_batches()

    @abstractmethod
    def admission_call(self, request: RequestT) -> AdmissionCall:
        """The call as a rate check sees it."""

    @abstractmethod
    async def decide(
        self, conn: Any, batch: list[Waiting[RequestT, OutcomeT]], decided: dict[int, OutcomeT]
    ) -> Written:
        """Runs inside the batch's transaction on a raw asyncpg connection: puts each call it
        settles into `decided` (by arrival) and returns the wallet snapshots to publish and the
        copies to keep after COMMIT. A call whose future is already done has given up: leave
        no trace of it."""

    def _start_batches(self) -> None:
        if self._recheck is not None:
            if self._filling_until is None or len(self._queue) < self.batch_max:
                # A recheck is due already, and an arrival changes nothing about when: only a
                # batch leaving (_reschedule) or a full batch does. Every submit comes here, so
                # this stays O(1).
                return
            self._recheck.cancel()
            self._recheck = None
        loop = asyncio.get_running_loop()
        while self._queue and len(self._tasks) < self.batches_in_flight_max:
            now = loop.time()
            if not self._tasks and self._wait_to_fill(loop, now):
                return
            youngest_age = min((now - t for t in self._tasks.values()), default=None)
            if youngest_age is not None and youngest_age < limits.BATCH_STALL_SECONDS:
                self._recheck = loop.call_later(
                    limits.BATCH_STALL_SECONDS - youngest_age, self._recheck_due
                )
                return
            batch = self._queue[: self.batch_max]
            del self._queue[: self.batch_max]
            self._last_batch_size = len(batch)
            for waiting in batch:
                self.queue_seconds.observe(now - waiting.queued_at)
            task = asyncio.create_task(self._run(batch, now))
            self._tasks[task] = now
            self._live.add(task)
            task.add_done_callback(self._finished)

    @property
    def loop_cpu_share(self) -> float:
        """The event loop thread's CPU share as last measured (store/loop_load.py)."""
        return self._loop_load.share

    def _wait_to_fill(self, loop: asyncio.AbstractEventLoop, now: float) -> bool:
        """Whether the next batch waits for more calls (a recheck is then due when it stops):
        only while the server is saturated, up to fill_wait_seconds, until the batch is full."""
        if self._filling_until is None:
            saturated = (
                self._loop_load.look() >= limits.BATCH_FILL_CPU_SHARE_MIN
                and self._last_batch_size >= limits.BATCH_FILL_AFTER_CALLS
            )
            if not saturated or self.fill_wait_seconds <= 0 or len(self._queue) >= self.batch_max:
                return False
            self._filling_until = now + self.fill_wait_seconds
        elif now >= self._filling_until or len(self._queue) >= self.batch_max:
            self._filling_until = None
            self.counters.filled += 1
            return False
        self._recheck = loop.call_at(self._filling_until, self._recheck_due)
        return True

    def _recheck_due(self) -> None:
        self._recheck = None
        self._start_batches()

    def _reschedule(self) -> None:
        """The batches in flight changed: decide afresh when the next may start."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        self._start_batches()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._live.discard(task)
        self._reschedule()

    async def _admit(
        self, batch: list[Waiting[RequestT, OutcomeT]]
    ) -> list[Waiting[RequestT, OutcomeT]]:
        """The calls the admission lets through; the others are answered with its error."""
        if self.admission is None:
            return batch
        try:
            verdicts = await self.admission([self.admission_call(w.request) for w in batch])
        except Exception:  # the limiter falls back on its own; this is a bug: do not block
            log.exception("admission of a %s batch failed; letting it through", type(self).__name__)
            return batch
        admitted = []
        for waiting, refusal in zip(batch, verdicts, strict=True):
            if refusal is None:
                admitted.append(waiting)
            elif not waiting.future.done():
                waiting.future.set_exception(refusal)
        return admitted

    async def settle(
        self,
        batch: list[Waiting[RequestT, OutcomeT]],
        admitting: Admitting[RequestT, OutcomeT] | None,
        settled: Settled[OutcomeT],
    ) -> None:
        """Runs the batch: decides the calls `admitting` lets through (all when it is None),
        commits their changes and adds them to `settled` once committed. It calls
        `leave_flight` once no more than a COMMIT is left to wait for.

        By default one transaction: BEGIN while the rate check runs, `decide`, COMMIT."""
        decided: dict[int, OutcomeT] = {}
        if admitting is not None:
            admitting.start()
        async with self.connections.transaction() as conn:
            batch = await self.admitted(batch, admitting)
            written = await self.decide(conn, batch, decided) if batch else Written()
            # Only COMMIT is left: the next batch may open its transaction while this one's
            # fsync runs (on a wallet this one locked, it waits for the COMMIT).
            self.leave_flight()
        settled.add(decided, written)

    async def admitted(
        self,
        batch: list[Waiting[RequestT, OutcomeT]],
        admitting: Admitting[RequestT, OutcomeT] | None,
    ) -> list[Waiting[RequestT, OutcomeT]]:
        """The calls of `batch` that the rate check let through (it answered the others)."""
        if admitting is not None:
            batch = await admitting.result()
        if batch:
            self._count(batch)
        return batch

    async def _run(self, batch: list[Waiting[RequestT, OutcomeT]], started: float) -> None:
        # The rate check (a Redis round trip) runs beside the batch's first round trip to
        # Postgres where it has one to overlap (settle starts it): a lone call then waits for
        # the slower of them, not for both.
        admitting = Admitting(self._admit, batch) if self.admission else None
        settled: Settled[OutcomeT] = Settled()
        try:
            async with asyncio.timeout(limits.BATCH_TIMEOUT_SECONDS):
                await self.settle(batch, admitting, settled)
        except Exception:
            if admitting is not None:
                # Refusals hold on the one-call path too (_admit itself never raises).
                batch = await admitting.result()
            self.counters.failed_batches += 1
            log.warning(
                "%s of %d failed; each goes one by one",
                type(self).__name__,
                len(batch),
                exc_info=True,
            )
            # `settled` holds only what was committed before the failure: those calls are
            # answered, the others go one by one.
        self.leave_flight()  # a failed batch had not
        self.batch_seconds.observe(asyncio.get_running_loop().time() - started)
        published = settled.written.published
        for key, copy in settled.written.copies:
            self.copies.keep(key, copy)
        if published:
            self.publish.local(published)
            if self.publish.shared_first:
                await self.publish.shared(published)
        for waiting in batch:
            if not waiting.future.done():
                outcome = settled.outcomes.get(waiting.arrival)
                if outcome is None:
                    self.counters.handed_back += 1
                waiting.future.set_result(outcome)
        if published and not self.publish.shared_first:
            await self.publish.shared(published)

    def leave_flight(self) -> None:
        """This batch no longer counts against batches_in_flight_max: start the next."""
        current = asyncio.current_task()
        if current is not None and self._tasks.pop(current, None) is not None:
            self._reschedule()

    def _count(self, batch: list[Waiting[RequestT, OutcomeT]]) -> None:
        self.counters.batches += 1
        self.counters.requests += len(batch)
        self.counters.largest_batch = max(self.counters.largest_batch, len(batch))


# The column lists of the batch statements' inserts (their SELECTs list the values in this order).
JOURNAL_INSERT = """INSERT INTO journal (
        account_id, credit_type, sequence, kind, amount, available_after, reserved_after,
        grant_id, reservation_id, idempotency_key, principal, action, request_id, created_at_us,
        grant_effects_json)"""
RESERVATION_INSERT = """INSERT INTO reservations (
        account_id, reservation_id, credit_type, amount, status, created_at_us, expires_at_us,
        resolved_at_us, amount_committed, amount_released, amount_expired, action, request_id,
        metadata_json, idempotency_key, reserve_sequence, resolution_sequence)"""


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as columns, for statements that unnest one array per column."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width
