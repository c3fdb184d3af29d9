"""SetAccountStatus and ClawBack: what billing needs for disputes and refunds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from processes import TEST_CALLER
from rich_errors import error_info, error_reason
from sqlalchemy import select

from credits.v1 import credits_pb2 as pb
from store.database import create_engine
from store.schema import account_status_changes

Accounts = Callable[[str], str]


async def grant(stub: Any, account: str, amount: int, key: str = "g") -> pb.AddCreditsResponse:
    return await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account, amount=amount, idempotency_key=key, source=pb.GRANT_SOURCE_PURCHASE
        )
    )


async def test_a_locked_account_cannot_reserve_until_unlocked(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    await grant(server.stub, account, 100)
    lock = pb.SetAccountStatusRequest(
        account_id=account, status=pb.ACCOUNT_STATUS_LOCKED, reason="dispute dp_1 opened"
    )
    assert (await server.stub.SetAccountStatus(lock)).changed
    assert not (await server.stub.SetAccountStatus(lock)).changed  # already locked: no change
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r1")
        )
    assert (error.value.code(), error_reason(error.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_LOCKED",
    )
    check = await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, amount=1))
    assert (check.allowed, check.account_status) == (False, pb.ACCOUNT_STATUS_LOCKED)
    unlock = pb.SetAccountStatusRequest(
        account_id=account, status=pb.ACCOUNT_STATUS_ACTIVE, reason="dispute dp_1 won"
    )
    assert (await server.stub.SetAccountStatus(unlock)).changed
    await server.stub.Reserve(pb.ReserveRequest(account_id=account, amount=1, idempotency_key="r2"))

    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            log = (
                await conn.execute(
                    select(
                        account_status_changes.c.status,
                        account_status_changes.c.reason,
                        account_status_changes.c.principal,
                    )
                    .where(account_status_changes.c.account_id == account)
                    .order_by(account_status_changes.c.status_version)
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in log] == [
        ("locked", "dispute dp_1 opened", TEST_CALLER),
        ("active", "dispute dp_1 won", TEST_CALLER),
    ]


async def test_set_account_status_rejects_an_unspecified_status(
    start_server: Any, sqlite_url: str, accounts: Accounts
) -> None:
    server = await start_server(sqlite_url)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.SetAccountStatus(pb.SetAccountStatusRequest(account_id=accounts("a")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_claw_back_takes_only_unspent_credits_and_reports_the_shortfall(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    grant_id = (await grant(server.stub, account, 100)).grant.grant_id
    spent = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=30, idempotency_key="r")
    )
    await server.stub.Commit(
        pb.CommitRequest(
            account_id=account, reservation_id=spent.reservation.reservation_id, amount=20
        )
    )
    await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=5, idempotency_key="held")
    )
    # 100 granted: 20 consumed, 5 held by a pending hold, 75 remaining.
    request = pb.ClawBackRequest(
        account_id=account, grant_id=grant_id, amount=90, idempotency_key="refund-ch_1"
    )
    response = await server.stub.ClawBack(request)
    assert (response.amount_clawed_back, response.shortfall) == (75, 15)
    assert (response.grant.remaining, response.grant.held, response.grant.clawed_back) == (0, 5, 75)
    assert (response.entry.kind, response.entry.amount) == (pb.ENTRY_KIND_CLAWBACK, -75)
    assert await server.stub.ClawBack(request) == response  # a replay changes nothing
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (balance.available, balance.reserved) == (0, 5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.ClawBack(
            pb.ClawBackRequest(
                account_id=account, grant_id=grant_id, amount=10, idempotency_key="refund-ch_1"
            )
        )
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(error.value)
    assert info is not None and info.metadata["field"] == "amount"


async def test_claw_back_of_a_spent_grant_takes_nothing_and_journals_nothing(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    grant_id = (await grant(server.stub, account, 10)).grant.grant_id
    hold = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r")
    )
    await server.stub.Commit(
        pb.CommitRequest(account_id=account, reservation_id=hold.reservation.reservation_id)
    )
    response = await server.stub.ClawBack(
        pb.ClawBackRequest(
            account_id=account, grant_id=grant_id, amount=10, idempotency_key="refund"
        )
    )
    assert (response.amount_clawed_back, response.shortfall, response.HasField("entry")) == (
        0,
        10,
        False,
    )
    history = await server.stub.History(
        pb.HistoryRequest(account_id=account, kinds=[pb.ENTRY_KIND_CLAWBACK])
    )
    assert list(history.entries) == []


async def test_claw_back_of_an_unknown_grant_is_not_found_and_frees_its_key(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await server.stub.ClawBack(
            pb.ClawBackRequest(
                account_id=account, grant_id="grt_nope", amount=1, idempotency_key="k"
            )
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    grant_id = (await grant(server.stub, account, 5)).grant.grant_id
    response = await server.stub.ClawBack(
        pb.ClawBackRequest(account_id=account, grant_id=grant_id, amount=1, idempotency_key="k")
    )
    assert response.amount_clawed_back == 1
