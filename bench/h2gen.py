"""h2gen: a gRPC load generator that speaks raw HTTP/2 (h2c) from pre-encoded frames.

h2load sends one fixed body for every request, which is right for CheckCredits and History but
wrong for Reserve and AddCredits: a repeated idempotency key measures the replay path, and a
Commit needs the reservation id its Reserve returned. h2gen builds each request body itself
(unique keys, uniform or hot wallets, Reserve -> Commit chains) and otherwise does what h2load
does: a few connections, many concurrent streams each, frames written straight to the socket.
There is no gRPC client library in the loop, so one Python process drives tens of thousands of
calls per second (measure it against bench/noop_server.py; `make bench` does and reports it).

Per call it writes a HEADERS frame (a header block encoded once per method) and a DATA frame
(the 5-byte gRPC prefix and the protobuf), and reads the response's HEADERS, DATA and trailers,
decoding the trailers with a small HPACK decoder to get grpc-status. Latency is from when the
call was due (paced runs) or sent (closed loop) to its END_STREAM.

Run by bench/run.py, one process per worker:

    h2gen.py PLAN.json WORKER_INDEX OUT_PREFIX

writes OUT_PREFIX.json (counts and window figures) and OUT_PREFIX.<kind>.lat (latencies of
calls completed inside the measurement window, microseconds as native uint32).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import os
import random
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from credits.v1 import credits_pb2 as pb

# The caller's token, set by run.py (the bench calls as a caller with every scope).
AUTH_TOKEN_VARIABLE = "BENCH_AUTH_TOKEN"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
WINDOW_MAX = 2**31 - 1
# Grow the connection receive window again once this much DATA has arrived.
RECEIVE_WINDOW_REFILL = 2**30
SERVICE = b"/credits.v1.CreditsService/"
# In-flight calls get this long to finish after the window.
DRAIN_SECONDS = 10.0
# A paced flow that leaves this much after it was due is late.
LATE_NS = 5_000_000
# Paced runs hand out due calls this often.
PACING_TICK_SECONDS = 0.001

# Statuses that are not gRPC codes: the stream ended without grpc-status, was reset, the
# connection was lost, or grpc-status was not a plain number.
STATUS_NO_TRAILERS = -1
STATUS_RESET = -2
STATUS_CONNECTION_LOST = -3
STATUS_UNDECODABLE = -4


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def grpc_message(message: Any) -> bytes:
    body: bytes = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


# ---- HPACK (RFC 7541) ----------------------------------------------------------------------

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), value.encode())
    for name, value in (
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    )
)
# A Huffman-coded string we never needed to read (only names and values we look at are decoded;
# gRPC servers send grpc-status and grpc-message as plain literals).
HUFFMAN = b"<huffman>"


def encode_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman."""
    return b"\x00" + encode_int(len(name), 7) + name + encode_int(len(value), 7) + value


def request_header_block(path: bytes, authority: bytes) -> bytes:
    token = os.environ.get(AUTH_TOKEN_VARIABLE, "")
    return (
        b"\x83\x86"  # :method POST, :scheme http (static table)
        + encode_literal(b":path", path)
        + encode_literal(b":authority", authority)
        + encode_literal(b"content-type", b"application/grpc")
        + encode_literal(b"te", b"trailers")
        + encode_literal(b"user-agent", b"h2gen")
        + (encode_literal(b"authorization", b"Bearer " + token.encode()) if token else b"")
    )


class HpackError(Exception):
    pass


class HpackDecoder:
    """Decodes header blocks, keeping the dynamic table in step with the server's encoder."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.table: collections.deque[tuple[bytes, bytes]] = collections.deque()

    def _int(self, data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        huffman = data[pos] & 0x80
        length, pos = self._int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("string past the end of the block")
        return (HUFFMAN if huffman else data[pos:end]), end

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        dynamic = index - len(STATIC_TABLE) - 1
        if 0 <= dynamic < len(self.table):
            return self.table[dynamic]
        raise HpackError(f"header index {index} out of range")

    def _add(self, name: bytes, value: bytes) -> None:
        self.table.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        pos = 0
        while pos < len(data):
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = self._int(data, pos, 7)
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, pos = self._int(data, pos, 5)
                self.max_size = size
                self._evict()
                continue
            indexing = byte & 0xC0 == 0x40
            index, pos = self._int(data, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(data, pos)
            value, pos = self._string(data, pos)
            headers.append((name, value))
            if indexing:
                self._add(name, value)
        return headers


# ---- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to send, how hard, and when to measure. Shared by all workers of one run."""

    target: str
    workload: str
    account_prefix: str
    wallets: int
    hot_account: str
    run_id: str
    connections: int
    streams: int
    # Calls (flows) per second across all workers; 0 = closed loop, as fast as answers come.
    rate: float
    start_at: float  # time.monotonic() at which to start sending (shared by all processes)
    warmup: float
    duration: float
    # Load goes on this long after the window, so that it is steady until the window's end.
    tail: float = 0.5
    workers: int = 1
    amount: int = 1
    ttl_seconds: int = 3600
    credit_type: str = ""
    page_size: int = 0

    @staticmethod
    def load(path: str) -> Plan:
        with open(path) as f:
            return Plan(**json.load(f))


@dataclass
class Call:
    kind: str
    path_block: bytes
    body: bytes
    # Called with the response message bytes when the call succeeded; returns the next call of
    # the flow, if any.
    then: Callable[[bytes], Call | None] | None = None
    # Keep the response message (Reserve for its Commit, CheckCredits to see `cached`).
    keep_response: bool = False


def account_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:07d}"


class Workload:
    """Builds flows: one or more calls in sequence (Reserve then Commit for example)."""

    def __init__(self, plan: Plan, worker: int, authority: bytes) -> None:
        self.plan = plan
        self.rng = random.Random(f"{plan.run_id}/{worker}")
        self.key_prefix = f"{plan.run_id}-w{worker}-"
        self.serial = 0
        self.blocks = {
            name: request_header_block(SERVICE + name.encode(), authority)
            for name in ("CheckCredits", "Reserve", "Commit", "AddCredits", "History")
        }
        self.new_flow: Callable[[], Call] = {
            "check": self._check,
            "reserve": self._reserve,
            "reserve_hot": self._reserve_hot,
            "reserve_commit": self._reserve_commit,
            "add": self._add,
            "history": self._history,
            "mix": self._mix,
        }[plan.workload]

    def _account(self) -> str:
        return account_name(self.plan.account_prefix, self.rng.randrange(self.plan.wallets))

    def _key(self) -> str:
        self.serial += 1
        return f"{self.key_prefix}{self.serial}"

    def _check_call(self, account: str) -> Call:
        request = pb.CheckCreditsRequest(
            account_id=account, credit_type=self.plan.credit_type, amount=self.plan.amount
        )
        return Call("check", self.blocks["CheckCredits"], grpc_message(request), keep_response=True)

    def _reserve_call(self, account: str, then: Callable[[bytes], Call | None] | None) -> Call:
        request = pb.ReserveRequest(
            account_id=account,
            credit_type=self.plan.credit_type,
            amount=self.plan.amount,
            idempotency_key=self._key(),
            ttl_seconds=self.plan.ttl_seconds,
            action="bench.reserve",
        )
        return Call(
            "reserve",
            self.blocks["Reserve"],
            grpc_message(request),
            then,
            keep_response=then is not None,
        )

    def _commit_after(self, account: str) -> Callable[[bytes], Call | None]:
        def commit(response: bytes) -> Call:
            reservation = pb.ReserveResponse.FromString(response).reservation
            request = pb.CommitRequest(
                account_id=account, reservation_id=reservation.reservation_id
            )
            return Call("commit", self.blocks["Commit"], grpc_message(request))

        return commit

    def _check(self) -> Call:
        return self._check_call(self._account())

    def _reserve(self) -> Call:
        return self._reserve_call(self._account(), None)

    def _reserve_hot(self) -> Call:
        return self._reserve_call(self.plan.hot_account, None)

    def _reserve_commit(self) -> Call:
        account = self._account()
        return self._reserve_call(account, self._commit_after(account))

    def _add(self) -> Call:
        request = pb.AddCreditsRequest(
            account_id=self._account(),
            credit_type=self.plan.credit_type,
            amount=self.plan.amount,
            idempotency_key=self._key(),
            source=pb.GRANT_SOURCE_PURCHASE,
            action="bench.add",
        )
        return Call("add", self.blocks["AddCredits"], grpc_message(request))

    def _history(self) -> Call:
        request = pb.HistoryRequest(account_id=self._account(), page_size=self.plan.page_size)
        return Call("history", self.blocks["History"], grpc_message(request))

    def _mix(self) -> Call:
        """A metered request as a caller makes it: may I? hold it; charge it."""
        account = self._account()
        check = self._check_call(account)
        check.then = lambda _response: self._reserve_call(account, self._commit_after(account))
        return check


# ---- the HTTP/2 connection -----------------------------------------------------------------


@dataclass
class Stream:
    call: Call
    due_ns: int
    flow_due_ns: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


class Connection(asyncio.Protocol):
    def __init__(self, generator: Generator) -> None:
        self.gen = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.streams: dict[int, Stream] = {}
        self.next_stream_id = 1
        self.decoder = HpackDecoder(4096)
        self.send_window = 65535
        self.blocked: collections.deque[tuple[int, bytes]] = collections.deque()
        self.received_since_refill = 0
        # The header block being received (a HEADERS frame and its CONTINUATION frames).
        self.header_block = bytearray()
        self.header_end_stream = False
        self.max_streams = generator.plan.streams
        self.alive = False
        self.ready = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True
        settings = b"".join(
            key.to_bytes(2, "big") + value.to_bytes(4, "big")
            for key, value in (
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_MAX),
            )
        )
        self.transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (WINDOW_MAX - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))
        lost = list(self.streams.values())
        self.streams.clear()
        for stream in lost:
            self.gen.finished(self, stream, STATUS_CONNECTION_LOST)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        size = len(buffer)
        while size - pos >= 9:
            length = int.from_bytes(buffer[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > size:
                break
            kind = buffer[pos + 3]
            flags = buffer[pos + 4]
            stream_id = int.from_bytes(buffer[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            self._frame(kind, flags, stream_id, bytes(buffer[pos + 9 : end]))
            pos = end
        del buffer[:pos]
        self.flush()

    # -- sending

    def free_slots(self) -> int:
        return self.max_streams - len(self.streams) if self.alive else 0

    def send(self, call: Call, due_ns: int, flow_due_ns: int) -> None:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        self.streams[stream_id] = Stream(call, due_ns, flow_due_ns)
        self.out.append(frame(HEADERS, FLAG_END_HEADERS, stream_id, call.path_block))
        if self.blocked or len(call.body) > self.send_window:
            self.blocked.append((stream_id, call.body))
        else:
            self.send_window -= len(call.body)
            self.out.append(frame(DATA, FLAG_END_STREAM, stream_id, call.body))

    def flush(self) -> None:
        if self.out and self.transport is not None and self.alive:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _unblock(self) -> None:
        while self.blocked and len(self.blocked[0][1]) <= self.send_window:
            stream_id, body = self.blocked.popleft()
            self.send_window -= len(body)
            self.out.append(frame(DATA, FLAG_END_STREAM, stream_id, body))

    # -- receiving

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            self.received_since_refill += len(payload)
            if self.received_since_refill >= RECEIVE_WINDOW_REFILL:
                self.out.append(
                    frame(WINDOW_UPDATE, 0, 0, self.received_since_refill.to_bytes(4, "big"))
                )
                self.received_since_refill = 0
            stream = self.streams.get(stream_id)
            if stream is not None:
                if flags & FLAG_PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if stream.call.keep_response:
                    stream.data += payload
                if flags & FLAG_END_STREAM:
                    self._end(stream_id)
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & FLAG_PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & FLAG_PRIORITY:
                    payload = payload[5:]
                self.header_block = bytearray()
                self.header_end_stream = bool(flags & FLAG_END_STREAM)
            self.header_block += payload
            if flags & FLAG_END_HEADERS:
                # Decoded even for a stream we no longer track: the HPACK state must follow.
                headers = self.decoder.decode(bytes(self.header_block))
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.headers.extend(headers)
                    if self.header_end_stream:
                        self._end(stream_id)
        elif kind == SETTINGS:
            if not flags & FLAG_ACK:
                for i in range(0, len(payload) - 5, 6):
                    key = int.from_bytes(payload[i : i + 2], "big")
                    value = int.from_bytes(payload[i + 2 : i + 6], "big")
                    if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                        self.max_streams = min(self.gen.plan.streams, value)
                self.out.append(frame(SETTINGS, FLAG_ACK, 0, b""))
                if not self.ready.done():
                    self.ready.set_result(None)
        elif kind == WINDOW_UPDATE:
            if stream_id == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self._unblock()
        elif kind == PING:
            if not flags & FLAG_ACK:
                self.out.append(frame(PING, FLAG_ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self.gen.finished(self, stream, STATUS_RESET)
        elif kind == GOAWAY:
            self.gen.goaways += 1
            self.alive = False

    def _end(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id)
        status = STATUS_NO_TRAILERS
        for name, value in stream.headers:
            if name == b"grpc-status":
                status = int(value) if value.isdigit() else STATUS_UNDECODABLE
            elif name == b"grpc-message" and value:
                self.gen.note_message(stream.call.kind, value)
        self.gen.finished(self, stream, status)


# ---- the generator -------------------------------------------------------------------------


class Generator:
    def __init__(self, plan: Plan, worker: int) -> None:
        self.plan = plan
        self.worker = worker
        host, port = plan.target.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.workload = Workload(plan, worker, plan.target.encode())
        self.connections: list[Connection] = []
        start_ns = int(plan.start_at * 1e9)
        self.window_start_ns = start_ns + int(plan.warmup * 1e9)
        self.window_end_ns = self.window_start_ns + int(plan.duration * 1e9)
        self.stop_ns = self.window_end_ns + int(plan.tail * 1e9)
        self.sending = False
        self.counts: dict[str, dict[int, int]] = collections.defaultdict(
            lambda: collections.defaultdict(int)
        )
        self.window_counts: dict[str, dict[int, int]] = collections.defaultdict(
            lambda: collections.defaultdict(int)
        )
        self.window_flows = 0
        self.latencies: dict[str, array.array[int]] = collections.defaultdict(
            lambda: array.array("I")
        )
        self.messages: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: collections.defaultdict(int)
        )
        self.goaways = 0
        self.late_flows = 0
        self.uncached_checks = 0
        self.backlog_max = 0
        self.backlog: collections.deque[int] = collections.deque()
        self.in_flight = 0
        self.idle = asyncio.Event()

    def note_message(self, kind: str, message: bytes) -> None:
        # grpc-message is percent-encoded (gRPC over HTTP/2).
        text = urllib.parse.unquote(message.decode(errors="replace"))[:160]
        bucket = self.messages[kind]
        if text in bucket or len(bucket) < 20:
            bucket[text] += 1

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections_for_worker()):
            _, conn = await loop.create_connection(lambda: Connection(self), self.host, self.port)
            await conn.ready
            self.connections.append(conn)

    def connections_for_worker(self) -> int:
        share, extra = divmod(self.plan.connections, self.plan.workers)
        return max(1, share + (1 if self.worker < extra else 0))

    def start_flow(self, conn: Connection, flow_due_ns: int) -> None:
        """Latency counts from the send, as h2load does; paced runs count the flows that left
        late instead (`late_flows`): many of them mean the asked rate was not held."""
        now = time.monotonic_ns()
        if now - flow_due_ns > LATE_NS and self.window_start_ns <= now < self.window_end_ns:
            self.late_flows += 1
        self.in_flight += 1
        self.idle.clear()
        conn.send(self.workload.new_flow(), now, flow_due_ns)

    def finished(self, conn: Connection, stream: Stream, status: int) -> None:
        now = time.monotonic_ns()
        kind = stream.call.kind
        self.counts[kind][status] += 1
        in_window = self.window_start_ns <= now < self.window_end_ns
        if in_window:
            self.window_counts[kind][status] += 1
            self.latencies[kind].append(min((now - stream.due_ns) // 1000, 2**32 - 1))
        if (
            kind == "check"
            and status == 0
            and not pb.CheckCreditsResponse.FromString(bytes(stream.data[5:])).cached
        ):
            self.uncached_checks += 1
        then = stream.call.then
        if status == 0 and then is not None and conn.alive:
            following = then(bytes(stream.data[5:]))
            if following is not None:
                conn.send(following, now, stream.flow_due_ns)
                return
        # The flow is over.
        self.in_flight -= 1
        if in_window:
            self.window_flows += 1
        if self.sending:
            if self.plan.rate:
                self.pump()
            elif conn.alive:
                self.start_flow(conn, now)
        if self.in_flight == 0:
            self.idle.set()

    def pump(self) -> None:
        """Paced mode: gives due flows to connections with a free stream."""
        for conn in self.connections:
            free = conn.free_slots()
            while free > 0 and self.backlog:
                self.start_flow(conn, self.backlog.popleft())
                free -= 1
            conn.flush()

    async def run(self) -> None:
        await self.connect()
        delay = self.plan.start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.sending = True
        if self.plan.rate:
            await self._paced()
        else:
            for conn in self.connections:
                for _ in range(conn.free_slots()):
                    self.start_flow(conn, time.monotonic_ns())
                conn.flush()
            await asyncio.sleep(max(0.0, self.stop_ns / 1e9 - time.monotonic()))
        self.sending = False
        self.backlog.clear()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), DRAIN_SECONDS)
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()

    async def _paced(self) -> None:
        rate = self.plan.rate / self.plan.workers
        interval_ns = int(1e9 / rate)
        # Workers are offset so that their schedules interleave.
        next_due = time.monotonic_ns() + interval_ns * self.worker // self.plan.workers
        while True:
            now = time.monotonic_ns()
            if now >= self.stop_ns:
                return
            while next_due <= now:
                self.backlog.append(next_due)
                next_due += interval_ns
            self.pump()
            if self.window_start_ns <= now < self.window_end_ns:
                self.backlog_max = max(self.backlog_max, len(self.backlog))
            # uvloop's timers have millisecond resolution; a shorter sleep would spin.
            await asyncio.sleep(PACING_TICK_SECONDS)

    def report(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "connections": len(self.connections),
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "window_counts": {k: dict(v) for k, v in self.window_counts.items()},
            "window_flows": self.window_flows,
            "messages": {k: dict(v) for k, v in self.messages.items()},
            "goaways": self.goaways,
            "late_flows": self.late_flows,
            "uncached_checks": self.uncached_checks,
            "backlog_max": self.backlog_max,
        }


def main() -> None:
    plan_path, worker_text, out_prefix = sys.argv[1:4]
    plan = Plan.load(plan_path)
    worker = int(worker_text)
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    generator = Generator(plan, worker)
    run(generator.run())
    for kind, values in generator.latencies.items():
        with open(f"{out_prefix}.{kind}.lat", "wb") as f:
            values.tofile(f)
    with open(f"{out_prefix}.json", "w") as f:
        json.dump(generator.report(), f)


if __name__ == "__main__":
    main()
