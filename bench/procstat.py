"""CPU and memory accounting from /proc (Linux), without psutil.

CPU seconds are utime + stime in clock ticks (10 ms each on most kernels), so figures below
about 0.05 s are noise. A process tree's CPU includes children it has reaped (cutime, cstime).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    cpu_ticks: int  # utime + stime
    children_ticks: int  # cutime + cstime (reaped children)
    start_ticks: int  # since boot
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: split around the last ')'.
    head, _, tail = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is field 3 (state) of proc(5).
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        comm=comm,
        cpu_ticks=int(fields[11]) + int(fields[12]),
        children_ticks=int(fields[13]) + int(fields[14]),
        start_ticks=int(fields[19]),
        rss_bytes=int(fields[21]) * PAGE_SIZE,
    )


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is not None:
            children[stat.ppid].append(pid)
    return children


def descendants(pid: int) -> list[int]:
    children = children_by_parent()
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def tree_cpu_seconds(root_pids: list[int]) -> float:
    """CPU of these processes, their live descendants and every child they reaped."""
    ticks = 0
    for root in root_pids:
        for pid in [root, *descendants(root)]:
            stat = read_stat(pid)
            if stat is not None:
                ticks += stat.cpu_ticks + stat.children_ticks
    return ticks / CLOCK_TICKS


def tree_runqueue_wait_seconds(root_pids: list[int]) -> float:
    """Seconds the threads of these processes and their live descendants spent ready to run but
    waiting for a core (the second field of /proc/<pid>/task/<tid>/schedstat): on a busy
    machine, time a call waits that no profile of the process shows. 0 where the kernel keeps no
    scheduler statistics."""
    waited_ns = 0
    for root in root_pids:
        for pid in [root, *descendants(root)]:
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in threads:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        waited_ns += int(f.read().split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # the thread ended, or no statistics
    return waited_ns / 1e9


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in [root, *descendants(root)]:
        stat = read_stat(pid)
        if stat is not None:
            total += stat.rss_bytes
    return total


def uptime_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * CLOCK_TICKS)


def _cpu_line() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (nor waiting for I/O) since boot, steal included."""
    values = _cpu_line()
    idle = values[3] + values[4]
    # guest and guest_nice are already counted in user and nice.
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave this virtual machine's cores to others while they had
    work: on a shared host, the reason a run can be slow with nothing else running here."""
    return _cpu_line()[7] / CLOCK_TICKS


@dataclass
class PidSetMeter:
    """CPU of a changing set of processes, polled: each process counts from when it was first
    seen (or from 0 if it was born after the meter started) to when it was last seen. A process
    that ends between two polls loses at most one poll interval of CPU."""

    started_ticks: int = 0
    first: dict[int, int] = field(default_factory=dict)
    last: dict[int, int] = field(default_factory=dict)

    def start(self, pids: list[int]) -> None:
        self.started_ticks = uptime_ticks()
        self.first.clear()
        self.last.clear()
        self.poll(pids)

    def poll(self, pids: list[int]) -> None:
        for pid in pids:
            stat = read_stat(pid)
            if stat is None:
                continue
            if pid not in self.first:
                born_after_start = stat.start_ticks >= self.started_ticks
                self.first[pid] = 0 if born_after_start else stat.cpu_ticks
            self.last[pid] = stat.cpu_ticks

    def seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last) / CLOCK_TICKS
