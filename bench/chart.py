"""Renders throughput and p99 latency against concurrency from a bench result with a sweep.

    .venv/bin/python bench/chart.py [bench/results/latest.json] [docs/performance.png]

Needs matplotlib (`pip install matplotlib`); it is not a dependency of the service.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

LABELS = {
    "ceiling_grpc": "gRPC ceiling (no-op CheckCredits)",
    "check_cached": "CheckCredits (cache hit)",
    "ceiling_naive": "naive ceiling (bare reserve SQL)",
    "reserve_uniform": "Reserve (uniform wallets)",
}


def render(report: dict[str, Any], out: pathlib.Path) -> None:
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for row in report.get("sweep") or []:
        series[row["scenario"]].append(
            (row["concurrency"], row["calls_per_s"], row["latency"]["p99_ms"])
        )
    if not series:
        raise SystemExit("no sweep in this result: run `make bench SWEEP=1` first")
    fig, (throughput, p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in series.items():
        points.sort()
        levels = [p[0] for p in points]
        label = LABELS.get(name, name)
        throughput.plot(levels, [p[1] for p in points], marker="o", label=label)
        p99.plot(levels, [p[2] for p in points], marker="o", label=label)
    for axis, title, unit in ((throughput, "Throughput", "calls/s"), (p99, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent calls in flight")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    p99.set_yscale("log")
    throughput.legend(fontsize=8)
    commit = report.get("git", {}).get("commit", "")[:9]
    title = f"credits service, {report.get('date', '')}, commit {commit}, 2 cores"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    source = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    target = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "docs/performance.png")
    render(json.loads(source.read_text()), target)
