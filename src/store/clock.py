"""The server clock. Every time decision of the ledger reads it once, so tests can move time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_us(self) -> int:
        """Microseconds since the Unix epoch (UTC)."""
        ...


class SystemClock:
    def now_us(self) -> int:
        return time.time_ns() // 1000


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start_us: int) -> None:
        self._now_us = start_us

    def now_us(self) -> int:
        return self._now_us

    def advance_seconds(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go backwards"
        self._now_us += int(seconds * 1_000_000)
