"""How busy the event loop's thread is: the share of wall time it spent on the CPU lately.

A Python server's calls all run on one thread, so once that thread is on the CPU all the time
the process is saturated: more calls queue in gRPC's core, however idle the database is. This
is the signal the batchers read to tell a saturated server (where waiting for a bigger batch
costs nothing, every call waits anyway, and saves CPU) from a merely busy one (where a wait
would only add latency). The event loop's own lateness cannot tell them apart: calls in flight
wait inside gRPC's core, not in the loop's queue (docs/performance.md).
"""

from __future__ import annotations

import time

from store import limits


class LoopLoad:
    """The CPU share of the thread that creates it (the event loop's), smoothed over looks at
    least LOOP_LOAD_WINDOW_SECONDS apart. Read it only from that thread."""

    def __init__(self) -> None:
        self._wall_s = time.perf_counter()
        self._cpu_s = time.thread_time()
        self.share = 0.0

    def look(self) -> float:
        """The smoothed share (0 to 1), updated if the last update is a window old."""
        wall_s = time.perf_counter()
        elapsed_s = wall_s - self._wall_s
        if elapsed_s >= limits.LOOP_LOAD_WINDOW_SECONDS:
            cpu_s = time.thread_time()
            # Clamped: a first look from another thread than the creator's is off, once.
            share = min(1.0, max(0.0, (cpu_s - self._cpu_s) / elapsed_s))
            # An even mix of the last window and the ones before: one burst or pause moves
            # it half-way, and a few windows in a row settle it.
            self.share = (self.share + share) / 2
            self._wall_s, self._cpu_s = wall_s, cpu_s
        return self.share
