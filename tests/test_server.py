"""The server as ops and callers meet it: grpcurl, health, request ids, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import TEST_CALLER, free_port, open_channel, wait_serving
from rich_errors import error_reason, field_violations
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc
from server.app import CreditsApp
from server.config import ServerConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRPCURL = shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent)) or "grpcurl"
Accounts = Callable[[str], str]


def readme_grpcurl_session() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A session with grpcurl", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README's grpcurl session block is missing"
    return match.group(1)


@pytest.mark.slow
async def test_readme_quick_start_serves_and_its_grpcurl_session_works_as_pasted(
    tmp_path: pathlib.Path,
) -> None:
    """`make run` is `credits-server --migrate` on the embedded default; run exactly that in an
    empty directory, then paste the README's session into bash there (where `make run` put
    var/dev-token), with this interpreter's grpcurl on the PATH."""
    port = free_port()
    server = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "credits-server"), "--migrate"],
        cwd=tmp_path,
        env={**os.environ, "CREDITS_LISTEN": f"127.0.0.1:{port}"},
        stderr=subprocess.PIPE,
    )
    try:
        await wait_serving(f"127.0.0.1:{port}", server)
        assert (tmp_path / "var" / "credits.db").exists(), "make run uses var/credits.db"
        dev_token = (tmp_path / "var" / "dev-token").read_text().strip()
        assert (tmp_path / "var" / "dev-token").stat().st_mode & 0o077 == 0, "owner-only file"
        session = readme_grpcurl_session().replace("S=127.0.0.1:50051", f"S=127.0.0.1:{port}")
        bin_dir = pathlib.Path(sys.executable).parent
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", session],
            cwd=tmp_path,
            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "credits.v1.CreditsService" in result.stdout
        assert "grpc.health.v1.Health" in result.stdout
        assert '"status": "SERVING"' in result.stdout
        async with open_channel(f"127.0.0.1:{port}", token=dev_token) as channel:
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            balance = await stub.CheckCredits(
                pb.CheckCreditsRequest(account_id="user:42", consistent=True)
            )
            assert (balance.available, balance.reserved) == (410, 0)
            history = await stub.History(pb.HistoryRequest(account_id="user:42"))
            assert [e.kind for e in history.entries] == [
                pb.ENTRY_KIND_RELEASE,
                pb.ENTRY_KIND_RESERVE,
                pb.ENTRY_KIND_COMMIT,
                pb.ENTRY_KIND_RESERVE,
                pb.ENTRY_KIND_GRANT,
            ]
            assert {e.principal for e in history.entries} == {"dev"}
    finally:
        server.terminate()
        assert server.wait(15) == 0


async def test_grpcurl_describe_shows_the_documented_contract(
    start_server: Any, sqlite_url: str
) -> None:
    server = await start_server(sqlite_url)
    described = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-plaintext", server.address, "describe", "credits.v1.ReserveRequest"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert described.returncode == 0, described.stderr
    assert "Time to live in seconds" in described.stdout
    method = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-plaintext", server.address, "describe", "credits.v1.CreditsService.Commit"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert method.returncode == 0, method.stderr
    assert "Charges a pending reservation" in method.stdout


async def test_request_id_from_the_caller_is_echoed_and_journaled(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    call = server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=5, idempotency_key="k", source=pb.GRANT_SOURCE_ADMIN
        ),
        metadata=(("x-request-id", "req-abc-123"),),
    )
    response = await call
    assert ("x-request-id", "req-abc-123") in tuple(await call.trailing_metadata())
    assert response.entry.request_id == "req-abc-123"
    assert response.entry.principal == TEST_CALLER
    # A successful read skips the trailer (it journals nothing); a failed one carries it.
    read = server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account), metadata=(("x-request-id", "req-read"),)
    )
    await read
    assert all(key != "x-request-id" for key, _ in (await read.trailing_metadata()) or ())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.CheckCredits(
            pb.CheckCreditsRequest(account_id=""), metadata=(("x-request-id", "req-bad"),)
        )
    assert ("x-request-id", "req-bad") in tuple(refused.value.trailing_metadata() or ())


async def test_an_expired_deadline_changes_nothing(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.AddCredits(
            pb.AddCreditsRequest(
                account_id=account, amount=5, idempotency_key="k", source=pb.GRANT_SOURCE_ADMIN
            ),
            timeout=0.0001,
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.2)
    # A retry with the same key either finds the first outcome or makes the grant now: once.
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=5, idempotency_key="k", source=pb.GRANT_SOURCE_ADMIN
        )
    )
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert balance.available == 5


@pytest.mark.postgres
@pytest.mark.slow
async def test_health_reports_not_serving_while_the_database_is_unreachable_and_recovers(
    postgres_url: str, accounts: Accounts
) -> None:
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy_port = await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy_port).render_as_string(hide_password=False)
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=proxied,
        health_probe_interval_seconds=0.2,
        sweep_interval_seconds=3600,
    )
    app = CreditsApp(config)
    port = await app.start()
    channel = open_channel(f"127.0.0.1:{port}")
    stub = credits_pb2_grpc.CreditsServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    account = accounts("a")

    async def status(service: str = "credits.v1.CreditsService") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return (await health.Check(request)).status

    try:
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        await proxy.cut()
        await asyncio.sleep(1.0)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Liveness follows the process, not the database: an outage must not restart replicas.
        assert await status("liveness") == health_pb2.HealthCheckResponse.SERVING
        for call in (
            stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, consistent=True)),
            stub.Reserve(pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
        await proxy.start()
        await asyncio.sleep(1.0)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        balance = await stub.CheckCredits(
            pb.CheckCreditsRequest(account_id=account, consistent=True)
        )
        assert balance.available == 0
    finally:
        await channel.close()
        await asyncio.wait_for(app.stop(grace_seconds=0), 30)  # while the proxy is up
        await proxy.cut()


async def test_insufficient_credits_is_a_rich_failed_precondition(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.Reserve(
            pb.ReserveRequest(account_id=accounts("a"), amount=7, idempotency_key="r")
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error.value) == "INSUFFICIENT_CREDITS"
    assert "7" in (error.value.details() or "")


async def test_a_refused_call_logs_its_method_code_caller_and_time_a_successful_one_only_at_debug(
    start_server: Any, database_url: str, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(database_url)
    check = pb.CheckCreditsRequest(account_id=accounts("a"), amount=1)
    with caplog.at_level(logging.INFO, logger="credits.rpc"):
        await server.stub.CheckCredits(check)
        with pytest.raises(grpc.aio.AioRpcError):
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=accounts("a"), amount=7, idempotency_key="r")
            )
    lines = [r for r in caplog.records if r.name == "credits.rpc"]
    assert [r.getMessage() for r in lines] == ["Reserve FAILED_PRECONDITION"]
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert (fields["method"], fields["code"], fields["caller"]) == (
        "Reserve",
        "FAILED_PRECONDITION",
        TEST_CALLER,
    )
    assert fields["elapsed_ms"] > 0
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="credits.rpc"):
        await server.stub.CheckCredits(check)
    lines = [r for r in caplog.records if r.name == "credits.rpc"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [(logging.DEBUG, "CheckCredits OK")]


async def test_sweeper_loop_expires_holds_in_the_background(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url, sweep_interval_seconds=0.2)
    account = accounts("a")
    await server.stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=10, idempotency_key="g", source=pb.GRANT_SOURCE_ADMIN
        )
    )
    await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=4, idempotency_key="r", ttl_seconds=1)
    )
    await asyncio.sleep(2.0)
    history = await server.stub.History(
        pb.HistoryRequest(account_id=account, kinds=[pb.ENTRY_KIND_HOLD_EXPIRY])
    )
    assert [(e.principal, e.amount) for e in history.entries] == [("system", 0)]
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (balance.available, balance.reserved) == (10, 0)


async def test_every_problem_of_a_request_is_reported_at_once(
    start_server: Any, sqlite_url: str
) -> None:
    server = await start_server(sqlite_url)
    request = pb.AddCreditsRequest(account_id="x" * 200, amount=0, action="BAD ACTION")
    request.expires_at.seconds = 10**12  # beyond year 9999
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.AddCredits(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in field_violations(error.value)}
    assert {"account_id", "amount", "idempotency_key", "source", "action", "expires_at"} <= fields
