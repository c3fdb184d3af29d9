"""The bench's own arithmetic: the median of paired rounds, Postgres's I/O per call and the
database settings it may set (bench/run.py). The bench itself needs h2load and minutes; these
are the parts a wrong figure would come from."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_run() -> Iterator[ModuleType]:
    # bench/run.py imports its neighbours (seed, loadgen, ...) as top-level modules, and its
    # dataclasses look their module up in sys.modules.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_run"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_run", None)
        sys.path.remove(str(ROOT / "bench"))


def test_a_ratio_target_is_the_median_of_the_rounds_measured(bench_run: ModuleType) -> None:
    # One round in a slow spell (0.63) does not move the target.
    assert bench_run.median_ratio([0.84, 0.63, 0.84]) == 0.84
    assert bench_run.median_ratio([1.063, 0.981, 0.826]) == 0.981
    # A round with no throughput on one side has no ratio and does not count.
    assert bench_run.median_ratio([0.9, None, 1.0]) == 0.95
    assert bench_run.median_ratio([None]) is None
    assert bench_run.median_ratio([]) is None


def test_postgres_io_is_what_the_scenario_added_per_successful_call(
    bench_run: ModuleType,
) -> None:
    before = {"wal_fpi": 10, "wal_bytes": 1_000, "blks_read": 5}
    after = {"wal_fpi": 74, "wal_bytes": 401_000, "blks_read": 117}
    io = bench_run.postgres_io_per_call(before, after, 10)
    assert io["total"] == {"wal_fpi": 64, "wal_bytes": 400_000, "blks_read": 112}
    assert io["per_call"] == {"wal_fpi": 6.4, "wal_bytes": 40_000.0, "blks_read": 11.2}
    assert bench_run.postgres_io_per_call(before, after, 0)["per_call"]["wal_fpi"] is None
    # No pg_stat_wal (Postgres before 14): no figure rather than a wrong one.
    assert bench_run.postgres_io_per_call(None, after, 10) is None


def test_database_settings_are_plain_names_with_values(bench_run: ModuleType) -> None:
    assert bench_run._db_settings("") == ()
    assert bench_run._db_settings("wal_compression=lz4, work_mem = 8MB") == (
        ("wal_compression", "lz4"),
        ("work_mem", "8MB"),
    )
    # The name goes into ALTER DATABASE as it is: anything but an identifier is refused.
    for bad in ("wal_compression", "x; DROP DATABASE postgres=1", "a b=1", "=lz4"):
        with pytest.raises(SystemExit):
            bench_run._db_settings(bad)


def _row(calls_per_s: float, steal: float) -> dict[str, Any]:
    return {"calls_per_s": calls_per_s, "cpu_cores": {"steal": steal}}


def test_a_ratio_in_rounds_is_disturbed_only_when_most_rounds_were(
    bench_run: ModuleType,
) -> None:
    bench = bench_run.Bench(bench_run.Settings.from_env())
    try:
        ratios = [0.84, 0.63, 0.84]
        bench.results = {
            "ceiling_grpc": _row(3000, 0.39),
            "check_cached": {
                **_row(2520, 0.40),
                "ratio_to_ceiling": {"ratio": 0.84, "rounds": ratios, "median_of_rounds": 0.84},
            },
        }
        # Round 2 lost 0.63 cores, round 3 none: the median ratio stands.
        rows = [_row(1890, 0.63), _row(3000, 0.27), _row(4000, 0.04), _row(3360, 0.02)]
        bench.report["rounds"] = {"check_cached": {"ceiling": "ceiling_grpc", "rows": rows}}
        target = next(t for t in bench.targets() if t["target"].startswith("CheckCredits ("))
        assert target["value"] == 0.84 and target["met"] is True
        assert "median of 3 paired rounds" in target["target"]
        # Per round, the more stolen row: 0.40, 0.63, 0.04; their median is 0.40.
        assert target["steal_cores"] == 0.4 and target["disturbed"] is True
        rows[3] = _row(3360, 0.0)
        rows[0] = _row(1890, 0.05)
        rows[1] = _row(3000, 0.05)
        target = next(t for t in bench.targets() if t["target"].startswith("CheckCredits ("))
        # 0.40, 0.05, 0.04: one disturbed round of three does not disturb the median.
        assert target["steal_cores"] == 0.05 and target["disturbed"] is False
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)


def test_a_p99_at_half_of_peak_is_the_median_of_its_rounds(bench_run: ModuleType) -> None:
    assert bench_run.median_p99([3.79, 11.24, 4.36]) == 4.36
    assert bench_run.median_p99([13.0, None, 11.0]) == 12.0
    assert bench_run.median_p99([None]) is None
    bench = bench_run.Bench(bench_run.Settings.from_env())
    try:
        half = {
            **_row(4599, 0.30),
            "latency": {
                "p99_ms": 11.24,
                "p99_rounds_ms": [11.24, 3.79, 4.36],
                "p99_median_of_rounds_ms": 4.36,
            },
        }
        bench.results = {"check_cached_half": half}
        rows = [_row(4599, 0.02), _row(4599, 0.01)]
        bench.report["half_rounds"] = {"check_cached_half": {"rows": rows}}
        target = next(t for t in bench.targets() if t["target"].startswith("CheckCredits p99"))
        assert target["value"] == 4.36 and target["met"] is True
        assert "median of 3 rounds" in target["target"]
        # Steal per round 0.30, 0.02, 0.01: one disturbed round does not disturb the median.
        assert target["steal_cores"] == 0.02 and target["disturbed"] is False
        # Measured once (BENCH_ROUNDS=1): that run's p99 and its own steal.
        bench.results = {"check_cached_half": {**half, "latency": {"p99_ms": 11.24}}}
        bench.report["half_rounds"] = {}
        target = next(t for t in bench.targets() if t["target"].startswith("CheckCredits p99"))
        assert target["value"] == 11.24 and target["met"] is False
        assert target["target"] == "CheckCredits p99 at half peak (ms)"
        assert target["steal_cores"] == 0.3
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)


def test_a_scale_ratio_divides_by_the_median_of_the_rounds(bench_run: ModuleType) -> None:
    bench = bench_run.Bench(bench_run.Settings.from_env())
    try:
        bench.results = {"reserve_uniform": _row(3380, 0.0), "reserve_hot": _row(3970, 0.0)}
        rows = [
            {**_row(2700, 0.0), "scenario": "reserve_uniform"},
            {**_row(2300, 0.0), "scenario": "ceiling_naive"},
            {**_row(2200, 0.0), "scenario": "ceiling_naive"},
            {**_row(3000, 0.0), "scenario": "reserve_uniform"},
        ]
        bench.report["rounds"] = {"reserve_uniform": {"ceiling": "ceiling_naive", "rows": rows}}
        # Round 1 ran fast (3,380): the median of 3,380, 2,700 and 3,000 is the base, and the
        # ceiling's rows never count.
        assert bench.base_calls_per_s("reserve_uniform") == 3000
        # Not measured in rounds: its one run.
        assert bench.base_calls_per_s("reserve_hot") == 3970
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)


def test_a_reserve_scenario_splits_a_call_into_its_wait_and_its_batch(
    bench_run: ModuleType,
) -> None:
    before = {name: 0.0 for name in bench_run.BATCH_METRICS}
    before["credits_reserve_batches_total"] = 10
    after = {
        "credits_reserve_batches_total": 110,
        "credits_reserve_batch_requests_total": 300,
        "credits_reserve_batch_fill_waits_total": 0,
        "credits_reserve_batch_queue_seconds_count": 300,
        "credits_reserve_batch_queue_seconds_sum": 0.6,
        "credits_reserve_batch_duration_seconds_count": 100,
        "credits_reserve_batch_duration_seconds_sum": 0.35,
    }
    # Waits: 250 of 300 at most 1 ms, 297 at most 10 ms, all at most 20 ms. Batches: 99 of 100
    # at most 5 ms.
    queue = {"0.001": 250, "0.0025": 280, "0.005": 290, "0.0075": 295, "0.01": 297}
    for bound in bench_run.BUCKETS:
        after[f"credits_reserve_batch_queue_seconds_bucket:{bound}"] = queue.get(
            bound, 0 if float(bound) < 0.001 else 300
        )
        after[f"credits_reserve_batch_duration_seconds_bucket:{bound}"] = (
            0 if float(bound) < 0.005 else 99 if float(bound) < 0.0075 else 100
        )
    sizes = bench_run.batch_sizes(before, after)
    assert sizes["calls_per_batch"] == 3.0
    assert (sizes["queue_ms_mean"], sizes["batch_ms_mean"]) == (2.0, 3.5)
    assert (sizes["queue_ms_p99_at_most"], sizes["batch_ms_p99_at_most"]) == (10.0, 5.0)
    # A server without the metrics (SQLite, or an older build): no figure rather than a wrong one.
    assert bench_run.batch_sizes(before, before)["queue_ms_mean"] is None
    assert bench_run.batch_sizes(before, before)["queue_ms_p99_at_most"] is None
    assert bench_run.bucket_quantile_ms([0] * 18 + [5], 0.5) is None  # beyond 10 s


def test_pace_shares_are_read_in_order_and_refused_outside_0_to_1(bench_run: ModuleType) -> None:
    assert bench_run.pace_shares("") == ()
    assert bench_run.pace_shares("0.5, 0.3,1") == (0.5, 0.3, 1.0)
    for bad in ("0", "1.5", "-0.2", "half", "nan"):
        with pytest.raises(SystemExit, match="PACE_SHARES"):
            bench_run.pace_shares(bad)
    with pytest.raises(SystemExit, match="at most"):
        bench_run.pace_shares(",".join(["0.1"] * (bench_run.PACE_SHARES_MAX + 1)))


def test_half_of_peak_rounds_wait_for_the_ratio_rounds_and_take_half_the_median_peak(
    bench_run: ModuleType,
) -> None:
    def deferred(rounds: int) -> set[str]:
        bench = SimpleNamespace(settings=SimpleNamespace(rounds=rounds))
        return {s.name for s in bench_run.SCENARIOS if bench_run.Bench.deferred(bench, s)}

    # In rounds, every half-of-peak p99 target runs after the ratio rounds; alone, right after
    # its peak. History's half-of-peak (no rounds) never waits.
    assert deferred(3) == set(bench_run.HALF_ROUNDS)
    assert deferred(1) == set()
    assert "history_half" not in deferred(3)
    # Round 1 of the peak was a slow spell (2,609 calls/s against 3,310 and 3,353): the pace is
    # half of the median, not of round 1.
    bench = SimpleNamespace(
        results={"reserve_uniform": {"calls_per_s": 2609.0}},
        report={
            "rounds": {
                "reserve_uniform": {
                    "rows": [
                        {"scenario": "reserve_uniform", "calls_per_s": 3310.0},
                        {"scenario": "ceiling_naive", "calls_per_s": 2745.0},
                        {"scenario": "reserve_uniform", "calls_per_s": 3353.0},
                    ]
                }
            }
        },
    )
    peak = bench_run.Bench.base_calls_per_s(bench, "reserve_uniform")
    assert bench_run.half_of_peak(peak) == 1655.0
