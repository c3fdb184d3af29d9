"""Failures in the middle of a call leave nothing half-applied. Injected with real database
features (a held row lock, a trigger), not mocks."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from processes import open_channel, spawn_server, wait_serving
from sqlalchemy import text

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc
from store.database import create_engine

Accounts = Callable[[str], str]
pytestmark = pytest.mark.postgres


async def fund(stub: Any, account: str, amount: int) -> None:
    await stub.AddCredits(
        pb.AddCreditsRequest(
            account_id=account,
            amount=amount,
            idempotency_key="fund",
            source=pb.GRANT_SOURCE_PURCHASE,
        )
    )


async def balances(stub: Any, account: str) -> tuple[int, int]:
    b = await stub.CheckCredits(pb.CheckCreditsRequest(account_id=account, consistent=True))
    return b.available, b.reserved


async def test_a_deadline_that_passes_while_waiting_for_the_wallet_changes_nothing(
    start_server: Any, postgres_url: str, accounts: Accounts
) -> None:
    server = await start_server(postgres_url)
    account = accounts("a")
    await fund(server.stub, account, 100)
    engine = create_engine(postgres_url)
    try:
        async with engine.begin() as conn:  # another writer holds the wallet row
            await conn.execute(
                text("SELECT 1 FROM wallets WHERE account_id = :a FOR UPDATE"), {"a": account}
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await server.stub.Reserve(
                    pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r1"),
                    timeout=0.5,
                )
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await engine.dispose()
    await asyncio.sleep(0.2)
    assert await balances(server.stub, account) == (100, 0)
    # The key was not used up by the abandoned attempt.
    response = await server.stub.Reserve(
        pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r1")
    )
    assert response.reservation.amount == 10


@pytest.mark.batch_failures_expected
async def test_an_unexpected_database_error_is_internal_quotes_the_request_id_and_rolls_back(
    start_server: Any, postgres_url: str, accounts: Accounts
) -> None:
    server = await start_server(postgres_url)
    account = accounts("a")
    await fund(server.stub, account, 100)
    trigger = f"fail_{account.split(':')[0]}"
    engine = create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            # Fails the reservation insert, after the grants were already updated in the same
            # transaction: exactly the spot where a half-applied change would show.
            await conn.execute(
                text(f"""
                CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.account_id = '{account}' THEN RAISE EXCEPTION 'injected failure'; END IF;
                    RETURN NEW;
                END $$""")
            )
            await conn.execute(
                text(
                    f"CREATE TRIGGER {trigger} BEFORE INSERT ON reservations "
                    f"FOR EACH ROW EXECUTE FUNCTION {trigger}()"
                )
            )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await server.stub.Reserve(
                pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r1"),
                metadata=(("x-request-id", "req-boom"),),
            )
        assert error.value.code() == grpc.StatusCode.INTERNAL
        details = error.value.details() or ""
        assert "req-boom" in details
        assert "injected" not in details and "reservations" not in details, "no internals leak"
        assert await balances(server.stub, account) == (100, 0)
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TRIGGER {trigger} ON reservations"))
            await conn.execute(text(f"DROP FUNCTION {trigger}()"))
        response = await server.stub.Reserve(
            pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r1")
        )
        assert response.entry.sequence == 2  # the failed attempt left no journal entry behind
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_sigterm_lets_in_flight_calls_finish_then_exits_cleanly(
    postgres_url: str, accounts: Accounts
) -> None:
    server = spawn_server(postgres_url, "--shutdown-grace-seconds", "10")
    account = accounts("a")
    engine = create_engine(postgres_url)
    try:
        await wait_serving(server.address, server.process)
        async with open_channel(server.address) as channel:
            stub = credits_pb2_grpc.CreditsServiceStub(channel)
            await fund(stub, account, 100)
            async with engine.begin() as conn:  # make the next call wait inside the server
                await conn.execute(
                    text("SELECT 1 FROM wallets WHERE account_id = :a FOR UPDATE"), {"a": account}
                )
                in_flight = asyncio.ensure_future(
                    stub.Reserve(
                        pb.ReserveRequest(account_id=account, amount=10, idempotency_key="r1"),
                        timeout=30,
                    )
                )
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert not in_flight.done(), "the call is still waiting for the wallet"
            response = await in_flight  # the lock is gone: the call finishes within the grace
            assert response.reservation.amount == 10
        assert await asyncio.to_thread(server.process.wait, 15) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
        await engine.dispose()
