"""CheckCredits answered from this process's memory (CreditsService._check_in_memory): the same
answer the full path gives, never to a caller the full path would refuse, and never older than
the last change this process saw commit. Real servers, real stubs; Redis behind the near copy
on Postgres, the in-process cache on SQLite.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from conftest import delete_redis_namespace, new_redis_namespace
from processes import open_channel
from rich_errors import error_info

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc
from store.callers import ALL_SCOPES, CallerStore, Scope
from store.database import create_engine
from store.tx import Transactor

Accounts = Callable[[str], str]
# Long enough that nothing expires while a test runs.
NEAR_CACHE_MS = 5_000


@pytest.fixture
async def server(
    start_server: Any, database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    if database_url.startswith("sqlite"):
        yield await start_server(database_url)
        return
    redis_url = request.getfixturevalue("redis_url")
    namespace = new_redis_namespace()
    try:
        yield await start_server(
            database_url,
            redis_url=redis_url,
            redis_namespace=namespace,
            near_cache_ms=NEAR_CACHE_MS,
        )
    finally:
        await delete_redis_namespace(redis_url, namespace)


def answered_in_memory(server: Any) -> int:
    assert server.app.service is not None
    return int(server.app.service.checks_answered_in_memory)


def balances(response: pb.CheckCreditsResponse) -> tuple[object, ...]:
    return (
        response.allowed,
        response.available,
        response.reserved,
        response.balance,
        response.shortfall,
        response.account_status,
    )


async def fund(stub: Any, account: str, amount: int) -> None:
    await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            amount=amount,
            idempotency_key=secrets.token_hex(6),
            source=pb.GRANT_SOURCE_ADMIN,
        )
    )


async def fund_and_fill(
    stub: Any, account: str, amount: int, check: pb.CheckCreditsRequest
) -> None:
    """Funds the account, then fills this process's copy of its balance with `check`."""
    await fund(stub, account, amount)
    await stub.CheckCredits(check)


async def reserve(stub: Any, account: str, amount: int, key: str) -> pb.ReserveResponse:
    """A hold long enough that it never expires while a test runs."""
    response: pb.ReserveResponse = await stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=amount, idempotency_key=key, ttl_seconds=600)
    )
    return response


async def test_a_repeated_check_is_answered_in_memory_as_the_database_would(
    server: Any, accounts: Accounts
) -> None:
    account = accounts("reader")
    await fund(server.stub, account, 10)
    await reserve(server.stub, account, 3, "r1")
    await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account))  # fills the copy
    for amount in (0, 1, 7, 8, 1_000_000_000_000):
        before = answered_in_memory(server)
        cached = await server.stub.CheckCredits(
            pb.CheckCreditsRequest(account_id=account, amount=amount)
        )
        assert answered_in_memory(server) == before + 1
        assert cached.cached
        fresh = await server.stub.CheckCredits(
            pb.CheckCreditsRequest(account_id=account, amount=amount, consistent=True)
        )
        assert not fresh.cached
        assert balances(cached) == balances(fresh), amount
    # Asked twice, the same amount gets the same answer (the message is reused).
    again = await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, amount=7))
    assert balances(again) == (True, 7, 3, 10, 0, pb.ACCOUNT_STATUS_ACTIVE)


async def test_a_repeated_check_reuses_its_answer_until_the_balance_changes(
    server: Any, accounts: Accounts
) -> None:
    # The cache hands out new snapshot objects on every read: a memo that compared them by
    # identity never hit, and every cached CheckCredits built its message afresh.
    account = accounts("memo")
    request = pb.CheckCreditsRequest(account_id=account, amount=4)
    await fund_and_fill(server.stub, account, 10, request)
    service = server.app.service
    first_memo_hits = service.checks_answered_from_memo
    answers = [await server.stub.CheckCredits(request) for _ in range(3)]
    assert service.checks_answered_from_memo >= first_memo_hits + 2
    assert {balances(a) for a in answers} == {(True, 10, 0, 10, 0, pb.ACCOUNT_STATUS_ACTIVE)}
    await reserve(server.stub, account, 7, "r")
    memo_hits = service.checks_answered_from_memo
    changed = await server.stub.CheckCredits(request)
    # A changed balance is never answered with the message kept for the old one.
    assert service.checks_answered_from_memo == memo_hits
    assert balances(changed) == (False, 3, 7, 10, 1, pb.ACCOUNT_STATUS_ACTIVE)
    assert changed.cached


async def test_an_answer_from_memory_follows_every_change_this_process_commits(
    server: Any, accounts: Accounts
) -> None:
    account = accounts("changing")
    request = pb.CheckCreditsRequest(account_id=account, amount=5)
    await fund_and_fill(server.stub, account, 10, request)
    reserved = await reserve(server.stub, account, 6, "r")
    after_reserve = await server.stub.CheckCredits(request)
    assert balances(after_reserve) == (False, 4, 6, 10, 1, pb.ACCOUNT_STATUS_ACTIVE)
    await server.stub.Commit(
        pb.CommitRequest(
            account_id=account, reservation_id=reserved.reservation.reservation_id, amount=2
        )
    )
    after_commit = await server.stub.CheckCredits(request)
    assert balances(after_commit) == (True, 8, 0, 8, 0, pb.ACCOUNT_STATUS_ACTIVE)
    await server.stub.SetAccountStatus(
        pb.SetAccountStatusRequest(
            account_id=account, status=pb.ACCOUNT_STATUS_LOCKED, reason="test"
        )
    )
    after_lock = await server.stub.CheckCredits(request)
    assert balances(after_lock) == (False, 8, 0, 8, 0, pb.ACCOUNT_STATUS_LOCKED)


async def test_a_cached_balance_is_never_answered_to_a_caller_the_full_path_refuses(
    server: Any, database_url: str, accounts: Accounts
) -> None:
    account, elsewhere = accounts("org:acme"), accounts("user:1")
    await fund_and_fill(server.stub, account, 10, pb.CheckCreditsRequest(account_id=account))
    engine = create_engine(database_url)
    try:
        callers = CallerStore(Transactor(engine))
        outsider, spender = accounts("outsider"), accounts("spender")
        await callers.add(outsider, ALL_SCOPES, (elsewhere,), "tests")
        await callers.add(spender, frozenset({Scope.SPEND}), (), "tests")
        tokens = {
            "ACCOUNT_NOT_ALLOWED": (await callers.create_token(outsider, "t", "tests"))[0],
            "SCOPE_MISSING": (await callers.create_token(spender, "t", "tests"))[0],
        }
    finally:
        await engine.dispose()
    for reason, token in tokens.items():
        channel = open_channel(server.address, token=token)
        async with channel:
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            # The first call teaches the server the token; the second could use what it learnt.
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.CheckCredits(pb.CheckCreditsRequest(account_id=account))
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert error_info(refused.value).reason == reason  # type: ignore[union-attr]
