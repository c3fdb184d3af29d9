"""Settings of gRPC's C core that must be in place before grpc is first imported.

gRPC reads `GRPC_EXPERIMENTS` once, when its extension module loads, so the server package
applies these from its `__init__` (every entry point imports the package before grpc).

`-event_engine_listener`: the server's sockets are accepted, read and written by the thread
that polls the completion queue (gRPC's older I/O manager) instead of by EventEngine's own
threads, which hand every event over to that thread: one hand-off less per event. On the
2-core development host the no-op server spent 5 to 15% less CPU per call at 3,000 calls/s,
the servers' threads waited for a core about half as long, and the p99s at half of peak fell
(docs/performance.md, lever 19). An operator's GRPC_EXPERIMENTS wins for any experiment it names.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Final

EXPERIMENTS_VARIABLE: Final = "GRPC_EXPERIMENTS"
# Experiment names this server sets unless the environment names them (with or without "-").
EXPERIMENTS_DEFAULT: Final = ("-event_engine_listener",)


def _name(entry: str) -> str:
    return entry.strip().lstrip("-").strip()


def with_default_experiments(value: str | None) -> str:
    """`value` (a GRPC_EXPERIMENTS list) with each default whose experiment it does not name
    appended: an operator's own choice about an experiment wins, and setting the variable for
    another experiment keeps these defaults."""
    entries = [e.strip() for e in (value or "").split(",") if e.strip()]
    named = {_name(e) for e in entries}
    entries += [d for d in EXPERIMENTS_DEFAULT if _name(d) not in named]
    return ",".join(entries)


def apply_defaults(environ: MutableMapping[str, str]) -> None:
    """Puts the defaults into `environ` (os.environ: the C core reads it through getenv)."""
    environ[EXPERIMENTS_VARIABLE] = with_default_experiments(environ.get(EXPERIMENTS_VARIABLE))
