"""Identifiers that sort by creation time, so "then grant id" in the burn-down order is stable."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds, then 64 random bits: unique across replicas without coordination.
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{secrets.token_hex(8)}"
