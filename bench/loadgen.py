"""Runs one load (h2load or h2gen) against a target and measures it: throughput, latency
percentiles, and the CPU every party spent inside the measurement window."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import procstat
from h2gen import AUTH_TOKEN_VARIABLE

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
# Time h2gen workers get to import, connect and line up before the shared start instant.
H2GEN_LEAD_SECONDS = 1.5
# How often the Postgres CPU meter looks for backends that come and go.
POLL_SECONDS = 0.5
# Load goes on this long after the window, so that it is steady until the window's end.
TAIL_SECONDS = 0.5
# In-flight calls get this long to finish after the window before a generator is stopped.
DRAIN_SECONDS = 15.0


@dataclass(frozen=True)
class Load:
    """One run of a generator against one target."""

    generator: str  # "h2load" or "h2gen"
    target: str  # host:port
    workload: str  # h2gen workload; h2load always posts `body` to `method`
    connections: int
    streams: int
    warmup: float
    duration: float
    rate: float = 0.0  # flows per second across the run; 0 = closed loop
    # h2gen
    account_prefix: str = ""
    wallets: int = 0
    hot_account: str = ""
    run_id: str = ""
    workers: int = 1
    page_size: int = 0  # History pages; 0: the server's default
    # h2load
    method: str = ""
    body: bytes = b""


@dataclass
class Measured:
    calls: int  # calls completed inside the window
    flows: int
    errors: dict[str, int]  # "kind:status" -> count, over the whole run
    ok_total: dict[str, int]  # successful calls by kind, over the whole run
    latencies_us: dict[str, list[int]]  # by call kind, sorted, inside the window
    cpu_seconds: dict[str, float | None] = field(default_factory=dict)
    generator_detail: dict[str, Any] = field(default_factory=dict)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


def latency_summary(sorted_us: list[int]) -> dict[str, float]:
    if not sorted_us:
        return {"n": 0}
    return {
        "n": len(sorted_us),
        "p50_ms": percentile(sorted_us, 0.50) / 1000,
        "p90_ms": percentile(sorted_us, 0.90) / 1000,
        "p99_ms": percentile(sorted_us, 0.99) / 1000,
        "p999_ms": percentile(sorted_us, 0.999) / 1000,
        "max_ms": sorted_us[-1] / 1000,
        "mean_ms": sum(sorted_us) / len(sorted_us) / 1000,
    }


class Meters:
    """CPU of the parties of one run, from the window's start to its end."""

    def __init__(
        self,
        server_pids: list[int],
        postgres_pids: Callable[[], Awaitable[list[int]]] | None,
        redis_pid: int | None,
    ) -> None:
        self.server_pids = server_pids
        self.postgres_pids = postgres_pids
        self.redis_pid = redis_pid
        self.postgres = procstat.PidSetMeter()
        self.start_values: dict[str, float] = {}
        self.generator_pids: list[int] = []

    def _trees(self) -> dict[str, float]:
        values = {
            "server": procstat.tree_cpu_seconds(self.server_pids),
            # Not CPU used: time the server's threads were ready but waited for a core.
            "server_wait": procstat.tree_runqueue_wait_seconds(self.server_pids),
            "generator": procstat.tree_cpu_seconds(self.generator_pids),
            "machine": procstat.machine_busy_seconds(),
            "steal": procstat.machine_steal_seconds(),
        }
        if self.redis_pid is not None:
            values["redis"] = procstat.tree_cpu_seconds([self.redis_pid])
        return values

    async def start(self, generator_pids: list[int]) -> None:
        self.generator_pids = generator_pids
        self.start_values = self._trees()
        if self.postgres_pids is not None:
            self.postgres.start(await self.postgres_pids())

    async def poll(self) -> None:
        if self.postgres_pids is not None:
            self.postgres.poll(await self.postgres_pids())

    async def stop(self) -> dict[str, float | None]:
        await self.poll()
        end = self._trees()
        result: dict[str, float | None] = {
            name: round(end[name] - self.start_values[name], 3) for name in end
        }
        result["postgres"] = (
            round(self.postgres.seconds(), 3) if self.postgres_pids is not None else None
        )
        result.setdefault("redis", None)
        # Everything else the machine did meanwhile: other processes, the kernel, this script;
        # not the hypervisor's steal, which has its own figure.
        ours = sum(
            v or 0.0 for k, v in result.items() if k not in ("machine", "steal", "server_wait")
        )
        result["other"] = round((result["machine"] or 0.0) - ours - (result["steal"] or 0.0), 3)
        return result


async def _measure_window(
    meters: Meters, generator_pids: list[int], window_start: float, window_end: float
) -> dict[str, float | None]:
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    await meters.start(generator_pids)
    while (remaining := window_end - time.monotonic()) > 0:
        await asyncio.sleep(min(POLL_SECONDS, remaining))
        await meters.poll()
    return await meters.stop()


async def _wait(process: asyncio.subprocess.Process, seconds: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"load generator pid {process.pid} did not finish in time") from None


# ---- h2load --------------------------------------------------------------------------------


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


_H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def _read_h2load_log(
    path: Path, window_start_us: int, window_end_us: int
) -> tuple[list[int], dict[str, int]]:
    """Latencies (us) of requests that ended inside the window, and HTTP statuses of all."""
    latencies: list[int] = []
    statuses: dict[str, int] = {}
    with path.open() as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
            elapsed = int(parts[2])
            if window_start_us <= int(parts[0]) + elapsed < window_end_us:
                latencies.append(elapsed)
    latencies.sort()
    return latencies, statuses


async def run_h2load(load: Load, meters: Meters, workdir: Path, name: str) -> Measured:
    """h2load runs through warm-up, window and tail in one go (its own warm-up option does not
    line up with our CPU window); the window is cut out of its per-request log afterwards."""
    data_file = workdir / f"{name}.body"
    log_file = workdir / f"{name}.h2load.log"
    _write_bytes(data_file, load.body)
    total_seconds = load.warmup + load.duration + TAIL_SECONDS
    args = [
        "h2load",
        f"--duration={round(total_seconds * 1000)}ms",
        f"--clients={load.connections}",
        f"--max-concurrent-streams={load.streams}",
        "--threads=1",
        f"--data={data_file}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={log_file}",
    ]
    token = os.environ.get(AUTH_TOKEN_VARIABLE, "")
    if token:
        args.append(f"--header=authorization: Bearer {token}")
    if load.rate:
        args.append(f"--rps={max(1, round(load.rate / load.connections))}")
    args.append(f"http://{load.target}/credits.v1.CreditsService/{load.method}")
    launched = time.monotonic()
    epoch_offset = time.time() - time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    window_start = launched + load.warmup
    window_end = window_start + load.duration
    cpu = await _measure_window(meters, [process.pid], window_start, window_end)
    output, _ = await asyncio.wait_for(process.communicate(), TAIL_SECONDS + DRAIN_SECONDS)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"h2load failed ({process.returncode}):\n{text}")
    requests = _H2LOAD_REQUESTS.search(text)
    if requests is None:
        raise RuntimeError(f"cannot parse h2load's output:\n{text}")
    total, _started, done, succeeded, failed, errored, timeout = map(int, requests.groups())
    latencies, statuses = _read_h2load_log(
        log_file,
        round((window_start + epoch_offset) * 1e6),
        round((window_end + epoch_offset) * 1e6),
    )
    errors = {
        f"{load.method}:http_{status}": count
        for status, count in statuses.items()
        if status != "200"
    }
    if failed or errored or timeout:
        errors[f"{load.method}:h2load_failed"] = failed + errored + timeout
    return Measured(
        calls=len(latencies),
        flows=len(latencies),
        errors=errors,
        ok_total={load.method: succeeded},
        latencies_us={load.method: latencies},
        cpu_seconds=cpu,
        generator_detail={"requests_total": total, "requests_done": done},
    )


# ---- h2gen ---------------------------------------------------------------------------------


def _write_plan(path: Path, plan: dict[str, Any]) -> None:
    path.write_text(json.dumps(plan))


def _read_h2gen_outputs(prefix: Path, workers: int) -> list[tuple[dict[str, Any], Path]]:
    return [
        (json.loads(Path(f"{prefix}.{worker}.json").read_text()), Path(f"{prefix}.{worker}"))
        for worker in range(workers)
    ]


def _read_latencies(path: Path) -> list[int]:
    values = array.array("I")
    if path.exists():
        values.frombytes(path.read_bytes())
    return values.tolist()


async def run_h2gen(load: Load, meters: Meters, workdir: Path, name: str) -> Measured:
    start_at = time.monotonic() + H2GEN_LEAD_SECONDS
    plan = {
        "target": load.target,
        "workload": load.workload,
        "account_prefix": load.account_prefix,
        "wallets": load.wallets,
        "hot_account": load.hot_account,
        "run_id": load.run_id,
        "connections": load.connections,
        "streams": load.streams,
        "rate": load.rate,
        "start_at": start_at,
        "warmup": load.warmup,
        "duration": load.duration,
        "tail": TAIL_SECONDS,
        "workers": load.workers,
        "page_size": load.page_size,
    }
    plan_file = workdir / f"{name}.plan.json"
    _write_plan(plan_file, plan)
    prefix = workdir / f"{name}.h2gen"
    processes = [
        await asyncio.create_subprocess_exec(
            PYTHON,
            str(BENCH_DIR / "h2gen.py"),
            str(plan_file),
            str(worker),
            f"{prefix}.{worker}",
            stderr=asyncio.subprocess.PIPE,
        )
        for worker in range(load.workers)
    ]
    window_start = start_at + load.warmup
    cpu = await _measure_window(
        meters, [p.pid for p in processes], window_start, window_start + load.duration
    )
    for process in processes:
        await _wait(process, DRAIN_SECONDS + 10)
        if process.returncode != 0:
            assert process.stderr is not None
            stderr = (await process.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"h2gen failed ({process.returncode}):\n{stderr}")
    calls = 0
    flows = 0
    errors: dict[str, int] = {}
    ok_total: dict[str, int] = {}
    latencies: dict[str, list[int]] = {}
    messages: dict[str, dict[str, int]] = {}
    late_flows = 0
    uncached_checks = 0
    backlog_max = 0
    for report, worker_prefix in _read_h2gen_outputs(prefix, load.workers):
        flows += report["window_flows"]
        late_flows += report["late_flows"]
        uncached_checks += report["uncached_checks"]
        backlog_max = max(backlog_max, report["backlog_max"])
        for kind, by_status in report["window_counts"].items():
            calls += sum(by_status.values())
            latencies.setdefault(kind, []).extend(
                _read_latencies(Path(f"{worker_prefix}.{kind}.lat"))
            )
        for kind, by_status in report["counts"].items():
            for status, count in by_status.items():
                if status == "0":
                    ok_total[kind] = ok_total.get(kind, 0) + count
                else:
                    key = f"{kind}:grpc_{status}"
                    errors[key] = errors.get(key, 0) + count
        for kind, texts in report["messages"].items():
            for text, count in texts.items():
                messages.setdefault(kind, {})[text] = count
    for values in latencies.values():
        values.sort()
    return Measured(
        calls=calls,
        flows=flows,
        errors=errors,
        ok_total=ok_total,
        latencies_us=latencies,
        cpu_seconds=cpu,
        generator_detail={
            "workers": load.workers,
            "error_messages": messages,
            "late_flows": late_flows,
            "uncached_checks": uncached_checks,
            "backlog_max": backlog_max,
        },
    )


async def run_load(load: Load, meters: Meters, workdir: Path, name: str) -> Measured:
    if load.generator == "h2load":
        return await run_h2load(load, meters, workdir, name)
    return await run_h2gen(load, meters, workdir, name)


def load_settings(load: Load) -> dict[str, Any]:
    settings = asdict(load)
    settings.pop("body")
    return settings


@contextlib.contextmanager
def timed() -> Any:
    started = time.monotonic()
    box: dict[str, float] = {}
    yield box
    box["seconds"] = round(time.monotonic() - started, 2)
