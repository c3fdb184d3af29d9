"""The server's settings of gRPC's C core (server/grpc_core.py) are in force in its process."""

from __future__ import annotations

import asyncio
import os
import pathlib

import pytest
from processes import spawn_server, wait_serving

from server.grpc_core import EXPERIMENTS_VARIABLE, with_default_experiments

# What gRPC logs (GRPC_TRACE=tcp, GRPC_VERBOSITY=debug) from the source file that sets up a
# listening socket of its older I/O manager: served by the completion queue's poller thread,
# not by EventEngine's threads (whose listener logs from posix_engine_* / posix_interface_*).
OLDER_IO_MANAGER_LISTENER_SOURCE = "socket_utils_common_posix.cc"


def test_the_defaults_join_whatever_the_environment_names() -> None:
    assert with_default_experiments(None) == "-event_engine_listener"
    assert with_default_experiments("") == "-event_engine_listener"
    assert with_default_experiments("other") == "other,-event_engine_listener"
    assert with_default_experiments(" other , ") == "other,-event_engine_listener"


def test_an_operators_choice_about_the_experiment_wins() -> None:
    assert with_default_experiments("event_engine_listener") == "event_engine_listener"
    assert with_default_experiments("x,-event_engine_listener") == "x,-event_engine_listener"


def _server_log(tmp_path: pathlib.Path, experiments: str | None) -> str:
    """stderr of a credits-server started with no GRPC_EXPERIMENTS of its parent (or the given
    one), once it serves: gRPC's own log of how it listens."""
    env = {k: v for k, v in os.environ.items() if k != EXPERIMENTS_VARIABLE}
    if experiments is not None:
        env[EXPERIMENTS_VARIABLE] = experiments
    env.update(GRPC_VERBOSITY="debug", GRPC_TRACE="tcp")
    log_path = tmp_path / "server.stderr"
    with log_path.open("wb") as log:
        # A file, not a pipe: gRPC's tracing may write more than a pipe holds.
        server = spawn_server(f"sqlite:///{tmp_path}/credits.db", env=env, stderr=log)
        try:
            asyncio.run(wait_serving(server.address, server.process))
        finally:
            server.terminate(timeout_seconds=30)
    return log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("experiments", "older_listener"),
    [(None, True), ("other_unknown", True), ("event_engine_listener", False)],
)
def test_credits_server_listens_through_the_pollers_thread_unless_told_otherwise(
    tmp_path: pathlib.Path, experiments: str | None, older_listener: bool
) -> None:
    # If a gRPC upgrade stops honouring the setting, this fails: remeasure (docs/performance.md,
    # lever 19) before dropping it.
    log = _server_log(tmp_path, experiments)
    assert (OLDER_IO_MANAGER_LISTENER_SOURCE in log) is older_listener, log[-3000:]
