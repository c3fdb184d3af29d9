"""Real `credits-server` processes for tests that need more than one server or a restart."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_SECONDS = 30.0

# The suite's own caller: every scope, every account. conftest stores this session's token
# (hashed) in every test database it migrates, so in-process and spawned servers accept it.
TEST_CALLER = "test-suite"
TEST_TOKEN = "crd_test_" + secrets.token_urlsafe(32)


def auth_metadata(token: str = TEST_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary call, like a real client would."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), *auth_metadata(self._token)]
        return await continuation(details._replace(metadata=metadata), request)


class _BlockingBearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), *auth_metadata(self._token)]
        return continuation(details._replace(metadata=metadata), request)


def open_channel(
    address: str,
    token: str | None = TEST_TOKEN,
    credentials: grpc.ChannelCredentials | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """The one place tests open a channel to a credits server: every call carries `token` (the
    suite's caller unless told otherwise; None: no credential), over TLS when `credentials`."""
    interceptors = [] if token is None else [_BearerToken(token)]
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def open_blocking_channel(address: str, token: str = TEST_TOKEN) -> grpc.Channel:
    """A synchronous channel carrying `token`, for code that runs in a thread."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _BlockingBearerToken(token))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    address: str

    def terminate(self, timeout_seconds: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_seconds)


def spawn_server(
    database_url: str,
    *extra_args: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    stderr: int | IO[bytes] = subprocess.PIPE,
) -> ServerProcess:
    """A credits-server process on `port` (a free one when None: pass the same port again to
    restart a server where its clients expect it), with this process's environment unless
    `env` is given, and its stderr piped unless `stderr` says where."""
    port = free_port() if port is None else port
    address = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.main",
            "--listen",
            address,
            "--database-url",
            database_url,
            "--log-level",
            "WARNING",
            *extra_args,
        ],
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    return ServerProcess(process, address)


async def wait_serving(address: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"server exited with {process.returncode}: {stderr[-2000:]}")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"server at {address} not serving after {READY_TIMEOUT_SECONDS} s")
