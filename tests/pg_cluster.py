"""Where the Postgres tests get their server: CREDITS_TEST_POSTGRES_URL, else a throwaway
cluster started from the machine's PostgreSQL binaries, else none (tests skip, loudly; with
CREDITS_REQUIRE_SERVICES=1 they fail instead)."""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def _server_binaries() -> pathlib.Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return pathlib.Path(initdb).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return pathlib.Path(candidate).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str | None]:
    """Yields the URL of a fresh cluster, or None when no server binaries are installed."""
    binaries = _server_binaries()
    if binaries is None:
        yield None
        return
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="credits-pg-"))
    # initdb refuses to run as root; run the cluster as the postgres user when we are root.
    run_as: list[str] = []
    if os.geteuid() == 0 and shutil.which("runuser"):
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    data, port = workdir / "data", _free_port()
    try:
        subprocess.run(
            [*run_as, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(workdir / "log"),
                "-o",
                f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError):
        shutil.rmtree(workdir, ignore_errors=True)
        yield None
        return
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        time.sleep(0.1)
        shutil.rmtree(workdir, ignore_errors=True)


class RestartableCluster:
    """A private cluster a test may stop and start again on the same port and data directory,
    so clients and servers configured with its URL find it again after an outage."""

    def __init__(
        self, port: int, workdir: pathlib.Path, binaries: pathlib.Path, run_as: list[str]
    ) -> None:
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.workdir = workdir
        self.binaries = binaries
        self.run_as = run_as

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.binaries / "pg_ctl"), "-D", str(self.workdir / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._pg_ctl(
            "-w",
            "-l",
            str(self.workdir / "log"),
            "-o",
            # fsync off: the tests stop the server process, never the machine, so the operating
            # system keeps every write and crash recovery still runs after an immediate stop.
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """mode: "fast" (roll back sessions, checkpoint) or "immediate" (like a crash)."""
        assert mode in ("smart", "fast", "immediate"), mode
        self._pg_ctl("-w", "-m", mode, "stop")


@contextlib.contextmanager
def restartable_cluster() -> Iterator[RestartableCluster | None]:
    """Yields a fresh, running cluster of this test's own, or None when no server binaries are
    installed (or the cluster cannot start). Removed, data and all, at the end."""
    binaries = _server_binaries()
    if binaries is None:
        yield None
        return
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="credits-pg-restartable-"))
    run_as: list[str] = []
    if os.geteuid() == 0 and shutil.which("runuser"):
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    cluster = RestartableCluster(_free_port(), workdir, binaries, run_as)
    try:
        subprocess.run(
            [
                *run_as,
                str(binaries / "initdb"),
                "-D",
                str(workdir / "data"),
                "-U",
                "postgres",
                "-A",
                "trust",
            ],
            check=True,
            capture_output=True,
        )
        cluster.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        shutil.rmtree(workdir, ignore_errors=True)
        yield None
        return
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            cluster.stop("immediate")
        time.sleep(0.1)
        shutil.rmtree(workdir, ignore_errors=True)
