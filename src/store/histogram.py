"""Latency histograms in plain numbers, for the metrics of things that run on the event loop.

prometheus_client's Histogram takes a lock on every update. These are updated on the event loop
and read by scrapes on the same loop, so they need none: an observation is a bisect and two
additions (docs/performance.md, lever 8). server/metrics.py exports them.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

# The service answers in 1 to 50 ms when healthy (docs/performance.md: p50 1 to 7 ms, p99 4 to
# 14 ms at half of peak) and in hundreds of ms when saturated; deadlines end it at seconds.
# Fine buckets where the budget is decided, coarse ones beyond. A Reserve batch and a call's wait
# for one are parts of a call, so they use the same bounds.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Observations counted per bucket of LATENCY_BUCKETS_SECONDS, and their sum."""

    __slots__ = ("per_bucket", "sum_seconds")

    def __init__(self) -> None:
        # Observations per bucket, not cumulative: index i holds those in (bound[i-1],
        # bound[i]], the last those above every bound.
        self.per_bucket = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        self.sum_seconds = 0.0

    def observe(self, seconds: float) -> None:
        # As Prometheus buckets are bounded: le means at most.
        self.per_bucket[bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
        self.sum_seconds += seconds

    def cumulative(self) -> list[int]:
        """Observations at most each bound, then all of them (Prometheus's buckets)."""
        return list(accumulate(self.per_bucket))
