"""Callers and scopes, as a caller meets them: real servers, real stubs, real databases.

Every RPC needs a credential (a bearer token, or a client certificate on a mutual-TLS listener)
and its scope; a caller may be held to account prefixes; the journal names who did what.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from credits_client import CreditsClient, PermissionDenied, Unauthenticated
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from processes import TEST_CALLER, TEST_TOKEN, auth_metadata, open_channel
from rich_errors import error_info, rich_status
from sqlalchemy import select, text

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc
from server.app import CreditsApp
from server.auth import METHOD_SCOPES, Authenticator, AuthFailure
from server.config import ServerConfig
from server.dev_token import DEV_CALLER, ensure_dev_token
from store.callers import ALL_SCOPES, CallerStore, Scope, new_token
from store.database import create_engine
from store.schema import caller_changes
from store.tx import Transactor

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRPCURL = shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent)) or "grpcurl"
Accounts = Callable[[str], str]
# Short, so tests can watch a revocation take effect; the default is 5 s.
TTL_SECONDS = 0.3


@dataclass
class Credential:
    name: str
    token: str


@pytest.fixture
async def callers(database_url: str) -> AsyncIterator[CallerStore]:
    engine = create_engine(database_url)
    try:
        yield CallerStore(Transactor(engine))
    finally:
        await engine.dispose()


@pytest.fixture
def new_caller(callers: CallerStore, accounts: Accounts) -> Callable[..., Any]:
    """new_caller("reader", {Scope.READ}, prefixes=()) -> a registered caller and its token."""

    async def make(
        name: str, scopes: frozenset[Scope] | set[Scope], prefixes: tuple[str, ...] = ()
    ) -> Credential:
        caller_name = accounts(name)  # unique per test, and a valid caller name
        await callers.add(caller_name, frozenset(scopes), prefixes, "tests")
        token, _ = await callers.create_token(caller_name, "test", "tests")
        return Credential(caller_name, token)

    return make


def stub_with(address: str, token: str | None) -> tuple[grpc.aio.Channel, Any]:
    channel = open_channel(address, token=token)
    return channel, credits_pb2_grpc.CreditsServiceStub(channel)


async def outcome(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """(code, ErrorInfo reason, ErrorInfo metadata, message) of a finished call."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        metadata = {} if info is None else dict(info.metadata)
        return error.code(), "" if info is None else info.reason, metadata, error.details() or ""
    return grpc.StatusCode.OK, "", {}, ""


def assert_no_secret(error: grpc.aio.AioRpcError, secret: str) -> None:
    assert secret not in (error.details() or "")
    assert secret.encode() not in rich_status(error).SerializeToString()


async def fund(stub: Any, account: str, amount: int) -> str:
    response = await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            amount=amount,
            idempotency_key=f"fund-{secrets.token_hex(4)}",
            source=pb.GRANT_SOURCE_ADMIN,
        )
    )
    return str(response.grant.grant_id)


async def hold(stub: Any, account: str) -> str:
    response = await stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=1, idempotency_key=secrets.token_hex(6))
    )
    return str(response.reservation.reservation_id)


async def allowed_request(method: str, admin: Any, account: str) -> Any:
    """A request for `method` that succeeds for a caller holding its scope (state made by the
    suite's own caller, `admin`)."""
    key = secrets.token_hex(6)
    if method == "CheckCredits":
        return pb.CheckCreditsRequest(account_id=account, amount=1)
    if method == "History":
        return pb.HistoryRequest(account_id=account)
    if method == "AddCredits":
        return pb.AddCreditsRequest(
            account_id=account, amount=5, idempotency_key=key, source=pb.GRANT_SOURCE_PROMOTION
        )
    if method == "Reserve":
        return pb.ReserveRequest(account_id=account, amount=1, idempotency_key=key)
    if method == "Commit":
        return pb.CommitRequest(account_id=account, reservation_id=await hold(admin, account))
    if method == "Release":
        return pb.ReleaseRequest(account_id=account, reservation_id=await hold(admin, account))
    if method == "SetAccountStatus":
        return pb.SetAccountStatusRequest(
            account_id=account, status=pb.ACCOUNT_STATUS_ACTIVE, reason="auth test"
        )
    assert method == "ClawBack", method
    grant_id = await fund(admin, account, 3)
    return pb.ClawBackRequest(account_id=account, grant_id=grant_id, amount=1, idempotency_key=key)


# ---- scopes -------------------------------------------------------------------------------------


async def test_every_rpc_is_allowed_with_its_scope_and_refused_naming_it_without(
    start_server: Any, database_url: str, accounts: Accounts, new_caller: Any
) -> None:
    server = await start_server(database_url)
    account = accounts("wallet")
    await fund(server.stub, account, 1000)
    holders = {scope: await new_caller(scope.value, {scope}) for scope in Scope}
    holders_of_nothing = await new_caller("nothing", set())
    assert set(METHOD_SCOPES) == set(
        pb.DESCRIPTOR.services_by_name["CreditsService"].methods_by_name
    )
    for method, needed in METHOD_SCOPES.items():
        for holder in [*holders.values(), holders_of_nothing]:
            channel, stub = stub_with(server.address, holder.token)
            async with channel:
                request = await allowed_request(method, server.stub, account)
                code, reason, metadata, message = await outcome(getattr(stub, method)(request))
            if holder is holders.get(needed):
                assert code == grpc.StatusCode.OK, (method, holder.name, message)
            else:
                assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"), (
                    method,
                    holder.name,
                    code,
                    message,
                )
                assert metadata == {"caller": holder.name, "method": method, "scope": needed}
                assert f"needs scope {needed}" in message and holder.name in message


async def test_a_caller_with_every_scope_may_do_everything(
    start_server: Any, database_url: str, accounts: Accounts, new_caller: Any
) -> None:
    server = await start_server(database_url)
    account = accounts("wallet")
    await fund(server.stub, account, 100)
    everything = await new_caller("all", ALL_SCOPES)
    channel, stub = stub_with(server.address, everything.token)
    async with channel:
        for method in METHOD_SCOPES:
            request = await allowed_request(method, server.stub, account)
            code, _, _, message = await outcome(getattr(stub, method)(request))
            assert code == grpc.StatusCode.OK, (method, message)


# ---- credentials --------------------------------------------------------------------------------


async def test_missing_garbled_and_unknown_credentials_are_unauthenticated_without_echo(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    unknown = new_token()
    garbled = "crd_abc def"  # a space inside: not a token
    cases = [
        ((), "CREDENTIAL_MISSING", ""),
        ((("authorization", f"Bearer {unknown}"),), "CREDENTIAL_INVALID", unknown),
        ((("authorization", f"Basic {unknown}"),), "CREDENTIAL_INVALID", unknown),
        ((("authorization", "Bearer"),), "CREDENTIAL_INVALID", ""),
        ((("authorization", "Bearer " + "x" * 400),), "CREDENTIAL_INVALID", "x" * 400),
        ((("authorization", f"Bearer {garbled}"),), "CREDENTIAL_INVALID", garbled),
        (
            (("authorization", f"Bearer {TEST_TOKEN}"), ("authorization", f"Bearer {unknown}")),
            "CREDENTIAL_INVALID",
            TEST_TOKEN,
        ),
    ]
    channel, stub = stub_with(server.address, None)
    async with channel:
        for metadata, reason, secret in cases:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.AddCredits(
                    pb.AddCreditsRequest(
                        account_id=accounts("a"),
                        amount=5,
                        idempotency_key="k",
                        source=pb.GRANT_SOURCE_ADMIN,
                    ),
                    metadata=metadata,
                )
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            info = error_info(error.value)
            assert info is not None and (info.domain, info.reason) == ("credits.v1", reason)
            if secret:
                assert_no_secret(error.value, secret)
        history = await server.stub.History(pb.HistoryRequest(account_id=accounts("a")))
    assert list(history.entries) == [], "a refused call changes nothing"


async def test_credentials_are_checked_before_the_request_is_decoded(
    start_server: Any, sqlite_url: str
) -> None:
    server = await start_server(sqlite_url)
    path = "/credits.v1.CreditsService/Reserve"
    async with open_channel(server.address, token=None) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await anonymous.unary_unary(path)(b"\xff\xff\xff")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.channel.unary_unary(path)(b"\xff\xff\xff")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rotation_two_live_tokens_then_the_revoked_one_fails_within_the_ttl(
    start_server: Any,
    database_url: str,
    accounts: Accounts,
    callers: CallerStore,
    new_caller: Any,
) -> None:
    server = await start_server(database_url, auth_cache_ttl_seconds=TTL_SECONDS)
    old = await new_caller("rotating", {Scope.READ})
    new, new_record = await callers.create_token(old.name, "next", "tests")
    listing = await callers.get(old.name)
    assert listing is not None
    old_record = next(t for t in listing.tokens if t.token_id != new_record.token_id)
    request = pb.CheckCreditsRequest(account_id=accounts("a"))
    for token in (old.token, new):
        channel, stub = stub_with(server.address, token)
        async with channel:
            await stub.CheckCredits(request)

    await callers.revoke_token(old.name, old_record.token_id, "tests")
    await asyncio.sleep(TTL_SECONDS * 2)
    channel, stub = stub_with(server.address, old.token)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CheckCredits(request)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error.value).reason == "CREDENTIAL_INVALID"  # type: ignore[union-attr]
    assert_no_secret(error.value, old.token)
    channel, stub = stub_with(server.address, new)
    async with channel:
        await stub.CheckCredits(request)


async def test_a_disabled_caller_is_refused_until_enabled_again(
    start_server: Any,
    database_url: str,
    accounts: Accounts,
    callers: CallerStore,
    new_caller: Any,
) -> None:
    server = await start_server(database_url, auth_cache_ttl_seconds=TTL_SECONDS)
    caller = await new_caller("toggled", {Scope.READ})
    request = pb.CheckCreditsRequest(account_id=accounts("a"))
    channel, stub = stub_with(server.address, caller.token)
    async with channel:
        await callers.set_active(caller.name, False, "tests")
        await asyncio.sleep(TTL_SECONDS * 2)
        code, reason, _, message = await outcome(stub.CheckCredits(request))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_DISABLED")
        assert f"callers enable {caller.name}" in message
        await callers.set_active(caller.name, True, "tests")
        await asyncio.sleep(TTL_SECONDS * 2)
        await stub.CheckCredits(request)


async def test_scope_changes_take_effect_within_the_ttl(
    start_server: Any,
    database_url: str,
    accounts: Accounts,
    callers: CallerStore,
    new_caller: Any,
) -> None:
    server = await start_server(database_url, auth_cache_ttl_seconds=TTL_SECONDS)
    caller = await new_caller("growing", {Scope.READ})
    request = pb.AddCreditsRequest(
        account_id=accounts("a"), amount=1, idempotency_key="k", source=pb.GRANT_SOURCE_ADMIN
    )
    channel, stub = stub_with(server.address, caller.token)
    async with channel:
        code, reason, _, _ = await outcome(stub.AddCredits(request))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
        await callers.grant(caller.name, frozenset({Scope.GRANT}), "tests")
        await asyncio.sleep(TTL_SECONDS * 2)
        response = await stub.AddCredits(request)
    assert response.entry.principal == caller.name


# ---- account prefixes and the journal -----------------------------------------------------------


async def test_a_caller_restricted_to_prefixes_is_denied_other_accounts(
    start_server: Any, database_url: str, accounts: Accounts, new_caller: Any
) -> None:
    server = await start_server(database_url)
    inside, outside = accounts("org:acme"), accounts("user:42")
    prefix = accounts("org:")
    tenant = await new_caller("tenant", ALL_SCOPES, prefixes=(prefix,))
    channel, stub = stub_with(server.address, tenant.token)
    async with channel:
        await fund(stub, inside, 10)
        await stub.CheckCredits(pb.CheckCreditsRequest(account_id=inside))
        for call in (
            stub.CheckCredits(pb.CheckCreditsRequest(account_id=outside)),
            stub.AddCredits(
                pb.AddCreditsRequest(
                    account_id=outside, amount=5, idempotency_key="k", source=pb.GRANT_SOURCE_ADMIN
                )
            ),
            stub.History(pb.HistoryRequest(account_id=outside)),
        ):
            code, reason, metadata, message = await outcome(call)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_NOT_ALLOWED")
            assert metadata == {
                "caller": tenant.name,
                "account_id": outside,
                "account_prefixes": prefix,
            }
            assert repr(prefix) in message and repr(outside) in message
    nothing = await server.stub.History(pb.HistoryRequest(account_id=outside))
    assert list(nothing.entries) == []


async def test_the_journal_names_the_authenticated_caller_of_every_change(
    start_server: Any, database_url: str, accounts: Accounts, new_caller: Any
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    billing = await new_caller("billing", {Scope.GRANT})
    worker = await new_caller("worker", {Scope.SPEND})
    channel, stub = stub_with(server.address, billing.token)
    async with channel:
        await fund(stub, account, 10)
    channel, stub = stub_with(server.address, worker.token)
    async with channel:
        reservation = await hold(stub, account)
        await stub.Commit(pb.CommitRequest(account_id=account, reservation_id=reservation))
    history = await server.stub.History(pb.HistoryRequest(account_id=account))
    assert [(e.kind, e.principal) for e in history.entries] == [
        (pb.ENTRY_KIND_COMMIT, worker.name),
        (pb.ENTRY_KIND_RESERVE, worker.name),
        (pb.ENTRY_KIND_GRANT, billing.name),
    ]


# ---- health and reflection ---------------------------------------------------------------------


async def test_health_needs_no_credential(start_server: Any, sqlite_url: str) -> None:
    server = await start_server(sqlite_url, reflection_requires_auth=True)
    async with open_channel(server.address, token=None) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    async with open_channel(address, token=None) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata
        )
        return [s.name for r in [r async for r in call] for s in r.list_services_response.service]


def grpcurl_list(address: str, *headers: str) -> subprocess.CompletedProcess[str]:
    arguments = [arg for header in headers for arg in ("-H", header)]
    return subprocess.run(
        [GRPCURL, "-plaintext", *arguments, address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_reflection_is_open_by_default(start_server: Any, sqlite_url: str) -> None:
    server = await start_server(sqlite_url)
    assert "credits.v1.CreditsService" in await list_services(server.address)


async def test_reflection_asks_for_a_credential_when_configured(
    start_server: Any, sqlite_url: str
) -> None:
    server = await start_server(sqlite_url, reflection_requires_auth=True)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await list_services(server.address)
    # The error itself in the message: this failed once in a full run, with its code unseen.
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, error.value
    assert error_info(error.value).reason == "CREDENTIAL_MISSING"  # type: ignore[union-attr]
    assert "credits.v1.CreditsService" in await list_services(server.address, auth_metadata())
    refused = await asyncio.to_thread(grpcurl_list, server.address)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    listed = await asyncio.to_thread(
        grpcurl_list, server.address, f"authorization: Bearer {TEST_TOKEN}"
    )
    assert listed.returncode == 0 and "credits.v1.CreditsService" in listed.stdout, listed.stderr


# ---- mutual TLS --------------------------------------------------------------------------------


def openssl(*arguments: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, capture_output=True, timeout=30)


def issue_certificate(cwd: pathlib.Path, name: str, subject: str, san: str = "") -> None:
    """name.key and name.pem, signed by ca.pem in cwd."""
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=cwd,
    )  # fmt: skip
    extension = ["-extfile", f"{name}.ext"] if san else []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extension,
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def certificates(tmp_path: pathlib.Path) -> pathlib.Path:
    """A CA, a server certificate for localhost/127.0.0.1, and client certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=credits test CA",
        cwd=tmp_path,
    )  # fmt: skip
    issue_certificate(tmp_path, "server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    return tmp_path


def tls_channel(address: str, folder: pathlib.Path, client: str | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        (folder / "ca.pem").read_bytes(),
        None if client is None else (folder / f"{client}.key").read_bytes(),
        None if client is None else (folder / f"{client}.pem").read_bytes(),
    )
    return open_channel(
        address,
        token=None,
        credentials=credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def test_a_verified_client_certificate_names_the_caller(
    start_server: Any,
    database_url: str,
    accounts: Accounts,
    callers: CallerStore,
    certificates: pathlib.Path,
) -> None:
    identity = f"spiffe://credits.test/{secrets.token_hex(6)}"
    await callers.add(identity, frozenset({Scope.READ, Scope.GRANT}), (), "tests")
    issue_certificate(certificates, "known", "/CN=not-registered", f"URI:{identity}")
    issue_certificate(certificates, "stranger", f"/CN=stranger-{secrets.token_hex(4)}")
    server = await start_server(
        database_url,
        tls_cert_file=str(certificates / "server.pem"),
        tls_key_file=str(certificates / "server.key"),
        tls_client_ca_file=str(certificates / "ca.pem"),
    )
    account = accounts("a")
    async with tls_channel(server.address, certificates, "known") as channel:
        stub = credits_pb2_grpc.CreditsServiceStub(channel)
        granted = await fund(stub, account, 7)
        history = await stub.History(pb.HistoryRequest(account_id=account))
        assert [(e.grant_id, e.principal) for e in history.entries] == [(granted, identity)]
        code, reason, metadata, _ = await outcome(
            stub.Reserve(pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r"))
        )
        assert (code, reason, metadata["scope"]) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "SCOPE_MISSING",
            "credits.spend",
        )
        # A token, when sent, decides who is calling; the certificate still admits the connection.
        reserved = await stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r"),
            metadata=auth_metadata(),
        )
        assert reserved.entry.principal == TEST_CALLER
        await stub.Release(
            pb.ReleaseRequest(
                account_id=account, reservation_id=reserved.reservation.reservation_id
            ),
            metadata=auth_metadata(),
        )
    async with tls_channel(server.address, certificates, "stranger") as channel:
        stub = credits_pb2_grpc.CreditsServiceStub(channel)
        code, reason, _, message = await outcome(
            stub.CheckCredits(pb.CheckCreditsRequest(account_id=account))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_INVALID")
        assert "stranger-" in message
    async with tls_channel(server.address, certificates, None) as channel:
        stub = credits_pb2_grpc.CreditsServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CheckCredits(pb.CheckCreditsRequest(account_id=account), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, "no certificate: no handshake"


# ---- the client library ------------------------------------------------------------------------


async def test_the_client_sends_its_token_and_raises_typed_auth_errors(
    start_server: Any, database_url: str, accounts: Accounts, new_caller: Any
) -> None:
    server = await start_server(database_url)
    reader = await new_caller("reader", {Scope.READ})
    async with CreditsClient(server.address, token=reader.token) as client:
        assert (await client.check(accounts("a"), 1)).shortfall == 1
        with pytest.raises(PermissionDenied) as denied:
            await client.reserve(accounts("a"), 1, idempotency_key="r")
        assert (denied.value.reason, denied.value.scope) == ("SCOPE_MISSING", "credits.spend")
    async with CreditsClient(server.address) as anonymous:
        with pytest.raises(Unauthenticated) as refused:
            await anonymous.check(accounts("a"))
        assert refused.value.reason == "CREDENTIAL_MISSING"
    with pytest.raises(ValueError, match="bare token"):
        CreditsClient(server.address, token=f"Bearer {reader.token}")


# ---- administration: the CLI, the change log, the dev token -------------------------------------


def callers_cli(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.main", "callers", *arguments],
        env={**os.environ, "CREDITS_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_the_callers_cli_adds_grants_issues_and_revokes(
    start_server: Any, sqlite_url: str, accounts: Accounts
) -> None:
    # SQLite only: the CLI is a thin shell over CallerStore, which the other tests run on both.
    server = await start_server(sqlite_url, auth_cache_ttl_seconds=TTL_SECONDS)
    name = accounts("cli")

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return callers_cli(sqlite_url, *arguments)

    added = await asyncio.to_thread(
        run, "add", name, "--scope", "credits.read", "--account-prefix", accounts("")
    )
    assert added.returncode == 0, added.stderr
    again = await asyncio.to_thread(run, "add", name)
    assert again.returncode == 1 and "already exists" in again.stderr
    bogus = await asyncio.to_thread(run, "grant", name, "--scope", "credits.everything")
    assert bogus.returncode == 1 and "unknown scope 'credits.everything'" in bogus.stderr
    granted = await asyncio.to_thread(run, "grant", name, "--scope", "credits.spend,credits.grant")
    assert granted.returncode == 0, granted.stderr
    created = await asyncio.to_thread(run, "token-create", name, "--label", "first")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("crd_") and "\n" not in token
    token_id = created.stderr.split()[1]
    assert token_id.startswith("tok_")

    channel, stub = stub_with(server.address, token)
    async with channel:
        response = await fund(stub, accounts("a"), 5)
        assert response
        listed = await asyncio.to_thread(run, "list")
        assert listed.returncode == 0 and token_id in listed.stdout and name in listed.stdout
        assert token not in listed.stdout + listed.stderr
        revoked = await asyncio.to_thread(run, "token-revoke", name, token_id)
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.sleep(TTL_SECONDS * 2)
        code, reason, _, _ = await outcome(
            stub.CheckCredits(pb.CheckCreditsRequest(account_id=accounts("a")))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_INVALID")

    engine = create_engine(sqlite_url)
    try:
        async with engine.connect() as conn:
            changes = (
                await conn.execute(
                    select(caller_changes.c.change, caller_changes.c.detail_json)
                    .where(caller_changes.c.caller_name == name)
                    .order_by(caller_changes.c.created_at_us, caller_changes.c.change_id)
                )
            ).all()
    finally:
        await engine.dispose()
    assert [c.change for c in changes] == [
        "added",
        "scopes_granted",
        "token_created",
        "token_revoked",
    ]
    assert all(token not in c.detail_json for c in changes)


async def test_the_caller_change_log_is_append_only(
    database_url: str, callers: CallerStore, accounts: Accounts
) -> None:
    await callers.add(accounts("logged"), frozenset({Scope.READ}), (), "tests")
    engine = create_engine(database_url)
    try:
        for statement in ("UPDATE caller_changes SET actor = 'x'", "DELETE FROM caller_changes"):
            with pytest.raises(Exception, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def test_the_dev_token_is_issued_on_a_fresh_sqlite_database_and_kept_across_restarts(
    tmp_path: pathlib.Path, accounts: Accounts
) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'credits.db'}"
    config = ServerConfig(
        listen="127.0.0.1:0", database_url=url, migrate_on_start=True, sweep_interval_seconds=3600
    )
    token_file = tmp_path / "var" / "dev-token"

    async def serve_once() -> None:
        app = CreditsApp(config)
        port = await app.start()
        try:
            channel, stub = stub_with(f"127.0.0.1:{port}", token_file.read_text().strip())
            async with channel:
                response = await fund(stub, accounts("a"), 5)
                assert response
                history = await stub.History(pb.HistoryRequest(account_id=accounts("a")))
                assert {e.principal for e in history.entries} == {DEV_CALLER}
        finally:
            await app.stop(grace_seconds=0)

    await serve_once()
    first = token_file.read_text()
    assert first.startswith("crd_") and token_file.stat().st_mode & 0o077 == 0
    await serve_once()  # callers exist now: the same token keeps working, none is added
    assert token_file.read_text() == first

    forced = ServerConfig(**{**config.__dict__, "dev_token": True})
    app = CreditsApp(forced)
    await app.start()
    await app.stop(grace_seconds=0)
    assert token_file.read_text() != first, "--dev-token issues a fresh token"
    engine = create_engine(url)
    try:
        dev = await CallerStore(Transactor(engine)).get(DEV_CALLER)
    finally:
        await engine.dispose()
    assert dev is not None and dev.caller.scopes == ALL_SCOPES
    assert [t.live for t in dev.tokens] == [False, True], "the earlier dev token is revoked"


async def test_no_dev_token_is_issued_on_postgres_unless_asked() -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the caller table was touched ({name})")

    store: Any = Untouchable()
    await ensure_dev_token(store, "postgresql://postgres@127.0.0.1/credits", forced=False)


class _NoDeadline:
    """What Authenticator reads of a call's context on a lookup: its time left (none here)."""

    def time_remaining(self) -> None:
        return None


@dataclass
class _TimedAuthenticator:
    """An Authenticator on the real caller store with a clock the test sets (`now`, seconds),
    its TTL 10 s, and one READ caller's token."""

    authenticator: Authenticator
    clock: list[float]
    caller: Credential
    request: pb.CheckCreditsRequest

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.caller.token)

    def at(self, seconds: float) -> None:
        self.clock[0] = seconds

    def in_memory(self) -> Any:
        return self.authenticator.authorize_in_memory(
            "CheckCredits", self.request.account_id, self.metadata
        )

    async def authorize(self) -> Any:
        context: Any = _NoDeadline()
        return await self.authenticator.authorize(
            "CheckCredits", self.request, context, self.metadata
        )

    async def settled(self) -> None:
        """Waits for the lookups the authenticator started behind its calls."""
        for _ in range(500):
            if not self.authenticator.lookups_ahead:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("a lookup started ahead of expiry never settled")


@pytest.fixture
async def timed(callers: CallerStore, new_caller: Any, accounts: Accounts) -> _TimedAuthenticator:
    clock = [0.0]
    authenticator = Authenticator(callers, 10.0, monotonic=lambda: clock[0])
    caller = await new_caller("timed", {Scope.READ})
    return _TimedAuthenticator(
        authenticator, clock, caller, pb.CheckCreditsRequest(account_id=accounts("a"))
    )


async def test_a_token_in_steady_use_is_looked_up_again_before_it_expires(
    timed: _TimedAuthenticator,
) -> None:
    # Without the lookup ahead, the call after the entry's expiry misses memory and every call
    # arriving meanwhile waits for one database lookup, once per TTL.
    await timed.authorize()
    timed.at(7.0)  # not yet in the last quarter: nothing started
    assert timed.in_memory() is not None
    assert not timed.authenticator.lookups_ahead
    timed.at(8.0)  # in the last quarter: answered from memory, looked up behind the call
    assert timed.in_memory() is not None
    assert timed.authenticator.lookups_ahead
    await timed.settled()
    timed.at(12.0)  # past the first lookup's expiry, within the second's
    known = timed.in_memory()
    assert known is not None and known.name == timed.caller.name
    timed.at(18.5)  # unused since 12: the second lookup's entry expired
    assert timed.in_memory() is None


async def test_a_token_revoked_while_in_use_fails_once_looked_up_again_within_the_ttl(
    timed: _TimedAuthenticator, callers: CallerStore
) -> None:
    await timed.authorize()
    listing = await callers.get(timed.caller.name)
    assert listing is not None
    await callers.revoke_token(timed.caller.name, listing.tokens[0].token_id, "tests")
    timed.at(8.0)  # the entry is 8 s old: still answered, and looked up again
    assert timed.in_memory() is not None
    await timed.settled()
    assert timed.in_memory() is None
    with pytest.raises(AuthFailure) as refused:
        await timed.authorize()
    assert refused.value.status.code == grpc.StatusCode.UNAUTHENTICATED
    timed.at(12.0)  # and so it stays, past the first entry's expiry
    with pytest.raises(AuthFailure):
        await timed.authorize()
