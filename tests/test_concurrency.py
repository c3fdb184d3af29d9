"""Many callers at once: no credit is spent twice, no key has two effects."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from conftest import assert_audit_clean
from processes import open_channel, spawn_server, wait_serving
from rich_errors import error_reason

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc

Accounts = Callable[[str], str]
WALLET_CREDITS = 100
RESERVES = 200


async def reserve_outcome(stub: Any, account: str, key: str) -> str:
    try:
        await stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=1, idempotency_key=key), timeout=60
        )
        return "OK"
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}:{error_reason(error)}"


async def fund(stub: Any, account: str, amount: int) -> None:
    await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            amount=amount,
            idempotency_key="fund",
            source=pb.GRANT_SOURCE_PURCHASE,
        )
    )


async def assert_drained(stub: Any, account: str) -> None:
    balance = await stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, consistent=True))
    assert (balance.available, balance.reserved) == (0, WALLET_CREDITS)


@pytest.mark.slow
async def test_200_concurrent_reserves_of_1_on_a_wallet_of_100_succeed_exactly_100_times(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("hot")
    await fund(server.stub, account, WALLET_CREDITS)
    outcomes = await asyncio.gather(
        *(reserve_outcome(server.stub, account, f"r{i}") for i in range(RESERVES))
    )
    assert Counter(outcomes) == {
        "OK": WALLET_CREDITS,
        "FAILED_PRECONDITION:INSUFFICIENT_CREDITS": RESERVES - WALLET_CREDITS,
    }
    await assert_drained(server.stub, account)


@pytest.mark.slow
@pytest.mark.postgres
async def test_two_server_processes_sharing_one_database_never_oversell(
    postgres_url: str, accounts: Accounts
) -> None:
    servers = [spawn_server(postgres_url) for _ in range(2)]
    try:
        for s in servers:
            await wait_serving(s.address, s.process)
        channels = [open_channel(s.address) for s in servers]
        stubs = [credits_pb2_grpc.CreditsServiceStub(c) for c in channels]
        account = accounts("shared")
        await fund(stubs[0], account, WALLET_CREDITS)
        outcomes = await asyncio.gather(
            *(reserve_outcome(stubs[i % 2], account, f"r{i}") for i in range(RESERVES))
        )
        assert Counter(outcomes) == {
            "OK": WALLET_CREDITS,
            "FAILED_PRECONDITION:INSUFFICIENT_CREDITS": RESERVES - WALLET_CREDITS,
        }
        await assert_drained(stubs[1], account)
        for channel in channels:
            await channel.close()
    finally:
        for s in servers:
            assert s.terminate() == 0, "a server must exit cleanly on SIGTERM"
    await assert_audit_clean(postgres_url, account)


@pytest.mark.slow
async def test_50_concurrent_identical_requests_with_one_key_have_one_effect(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    grant_request = pb.AddCreditsRequest(
        account_id=account, amount=10, idempotency_key="buy-once", source=pb.GRANT_SOURCE_PURCHASE
    )
    grants = await asyncio.gather(*(server.stub.AddCredits(grant_request) for _ in range(50)))
    assert len({g.SerializeToString() for g in grants}) == 1
    reserve_request = pb.ReserveRequest(account_id=account, amount=3, idempotency_key="hold-once")
    holds = await asyncio.gather(*(server.stub.Reserve(reserve_request) for _ in range(50)))
    assert len({h.SerializeToString() for h in holds}) == 1
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert (balance.available, balance.reserved) == (7, 3)
    history = await server.stub.History(pb.HistoryRequest(account_id=account))
    assert [e.kind for e in history.entries] == [pb.ENTRY_KIND_RESERVE, pb.ENTRY_KIND_GRANT]


@pytest.mark.slow
async def test_racing_commits_and_releases_resolve_a_reservation_once(
    start_server: Any, database_url: str, accounts: Accounts
) -> None:
    server = await start_server(database_url)
    account = accounts("a")
    await fund(server.stub, account, 100)
    hold = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=40, idempotency_key="r")
    )
    rid = hold.reservation.reservation_id

    async def attempt(i: int) -> str:
        try:
            if i % 2:
                await server.stub.Commit(
                    pb.CommitRequest(account_id=account, reservation_id=rid, amount=25)
                )
                return "committed"
            await server.stub.Release(pb.ReleaseRequest(account_id=account, reservation_id=rid))
            return "released"
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}:{error_reason(error)}"

    outcomes = Counter(await asyncio.gather(*(attempt(i) for i in range(20))))
    winners = {k for k in outcomes if k in ("committed", "released")}
    assert len(winners) == 1, outcomes
    balance = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=account, consistent=True)
    )
    assert balance.reserved == 0
    assert balance.available == (75 if winners == {"committed"} else 100)
