"""The client library against the real server: every call, every typed error, metered()."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from credits_client import (
    AccountLocked,
    CreditsClient,
    CreditsError,
    Hold,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    ReservationStateError,
    Unavailable,
    error_from_rpc,
)
from google.rpc import code_pb2, error_details_pb2, status_pb2
from processes import TEST_TOKEN

from credits.v1 import credits_pb2 as pb
from server.app import CreditsApp
from server.config import ServerConfig
from store.model import AccountStatus

Accounts = Callable[[str], str]


def key() -> str:
    return f"k-{secrets.token_hex(8)}"


@pytest.fixture
async def server(start_server: Callable[..., Any], database_url: str) -> Any:
    return await start_server(database_url)


@pytest.fixture
async def client(server: Any) -> AsyncIterator[CreditsClient]:
    async with CreditsClient(server.address, token=TEST_TOKEN) as client:
        yield client


async def grant(client: CreditsClient, account_id: str, amount: int) -> None:
    await client.add_credits(account_id, amount, idempotency_key=key(), source="purchase")


async def available(client: CreditsClient, account_id: str) -> tuple[int, int]:
    """(available, reserved), read from the database rather than the cache."""
    balance = await client.check(account_id, consistent=True)
    return balance.available, balance.reserved


# ---- calls ---------------------------------------------------------------------------------


async def test_add_check_reserve_commit_release_round_trip(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    added = await client.add_credits(
        account, 100, idempotency_key=key(), source="purchase", external_ref="in_1"
    )
    assert added.grant.amount == 100
    assert added.grant.source == pb.GRANT_SOURCE_PURCHASE
    assert added.entry.kind == pb.ENTRY_KIND_GRANT

    check = await client.check(account, 40, consistent=True)
    assert (check.allowed, check.available, check.balance) == (True, 100, 100)
    assert check.account_status == pb.ACCOUNT_STATUS_ACTIVE

    reserved = await client.reserve(
        account, 30, idempotency_key=key(), action="ai.chat", metadata={"model": "m1"}
    )
    hold = reserved.reservation
    assert hold.status == pb.RESERVATION_STATUS_PENDING
    assert (hold.amount, hold.action, dict(hold.metadata)) == (30, "ai.chat", {"model": "m1"})
    assert await available(client, account) == (70, 30)

    committed = await client.commit(account, hold.reservation_id, 20)
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert committed.reservation.amount_committed == 20
    assert committed.reservation.amount_released == 10
    assert await available(client, account) == (80, 0)

    second = await client.reserve(account, 50, idempotency_key=key())
    released = await client.release(account, second.reservation.reservation_id)
    assert released.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert await available(client, account) == (80, 0)

    history = await client.history(account)
    kinds = [entry.kind for entry in history.entries]
    assert kinds == [
        pb.ENTRY_KIND_RELEASE,
        pb.ENTRY_KIND_RESERVE,
        pb.ENTRY_KIND_COMMIT,
        pb.ENTRY_KIND_RESERVE,
        pb.ENTRY_KIND_GRANT,
    ]
    assert history.next_page_token == ""


async def test_commit_without_amount_charges_the_whole_hold(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    reserved = await client.reserve(account, 4, idempotency_key=key())
    committed = await client.commit(account, reserved.reservation.reservation_id)
    assert committed.reservation.amount_committed == 4
    assert await available(client, account) == (6, 0)


async def test_add_credits_takes_aware_datetimes_and_enum_values(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    added = await client.add_credits(
        account,
        5,
        idempotency_key=key(),
        source=pb.GRANT_SOURCE_PROMOTION,
        credit_type="ai",
        priority=10,
        expires_at=expires_at,
        metadata={"campaign": "spring"},
    )
    assert added.grant.expires_at.ToDatetime(tzinfo=UTC) == expires_at
    assert (added.grant.source, added.grant.priority) == (pb.GRANT_SOURCE_PROMOTION, 10)
    assert (await client.check(account, credit_type="ai", consistent=True)).available == 5
    assert (await client.check(account, consistent=True)).available == 0
    with pytest.raises(ValueError, match="time zone"):
        await client.add_credits(
            account, 1, idempotency_key=key(), source="purchase", expires_at=datetime(2030, 1, 1)
        )
    with pytest.raises(ValueError, match="GRANT_SOURCE_BOGUS"):
        await client.add_credits(account, 1, idempotency_key=key(), source="bogus")


async def test_iter_history_follows_page_tokens_newest_first(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    for _ in range(7):
        await grant(client, account, 1)
    entries = [entry async for entry in client.iter_history(account, page_size=2)]
    assert [entry.sequence for entry in entries] == [7, 6, 5, 4, 3, 2, 1]

    first_page = await client.history(account, page_size=2)
    assert len(first_page.entries) == 2 and first_page.next_page_token


async def test_iter_history_stops_after_max_pages(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    for _ in range(5):
        await grant(client, account, 1)
    entries = [entry async for entry in client.iter_history(account, page_size=2, max_pages=2)]
    assert [entry.sequence for entry in entries] == [5, 4, 3, 2]
    with pytest.raises(ValueError, match="max_pages"):
        _ = [entry async for entry in client.iter_history(account, max_pages=0)]


async def test_iter_history_filters_by_kind_name(client: CreditsClient, accounts: Accounts) -> None:
    account = accounts("a")
    await grant(client, account, 5)
    reserved = await client.reserve(account, 2, idempotency_key=key())
    await client.commit(account, reserved.reservation.reservation_id)
    entries = [entry async for entry in client.iter_history(account, kinds=["commit", "grant"])]
    assert [entry.kind for entry in entries] == [pb.ENTRY_KIND_COMMIT, pb.ENTRY_KIND_GRANT]


async def test_request_id_is_sent_as_header_and_recorded(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 5)
    reserved = await client.reserve(account, 2, idempotency_key=key(), request_id="req-reserve")
    assert reserved.entry.request_id == "req-reserve"
    committed = await client.commit(
        account, reserved.reservation.reservation_id, request_id="req-commit"
    )
    # Commit has no request_id field: the server records the x-request-id header.
    assert committed.entry.request_id == "req-commit"


async def test_client_on_an_existing_channel_leaves_it_open(
    server: Any, accounts: Accounts
) -> None:
    async with CreditsClient(server.channel) as client:
        await client.check(accounts("a"))
    # The fixture's own stub still works: the client did not close a channel it did not open.
    response = await server.stub.CheckCredits(pb.CheckCreditsRequest(account_id=accounts("a")))
    assert response.available == 0


# ---- errors --------------------------------------------------------------------------------


async def test_reserve_beyond_available_raises_insufficient_credits_with_amounts(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 5)
    with pytest.raises(InsufficientCredits) as caught:
        await client.reserve(account, 8, idempotency_key=key(), request_id="req-short")
    error = caught.value
    assert (error.required, error.available, error.shortfall) == (8, 5, 3)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "INSUFFICIENT_CREDITS"
    assert error.request_id == "req-short"
    assert "8" in error.message and not error.retryable
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert await available(client, account) == (5, 0)


async def test_error_carries_the_servers_request_id_when_the_caller_sent_none(
    client: CreditsClient, accounts: Accounts
) -> None:
    with pytest.raises(InsufficientCredits) as caught:
        await client.reserve(accounts("a"), 1, idempotency_key=key())
    assert caught.value.request_id  # generated by the server, echoed in the trailer


async def test_reserve_on_locked_account_raises_account_locked(
    server: Any, client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 5)
    # Locking has no RPC; it is an admin operation on the ledger the server runs.
    await server.app.ledger.set_account_status(account, AccountStatus.LOCKED)
    with pytest.raises(AccountLocked) as caught:
        await client.reserve(account, 1, idempotency_key=key())
    assert caught.value.reason == "ACCOUNT_LOCKED"
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION


async def test_reused_idempotency_key_names_the_differing_field(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    reused = key()
    first = await client.reserve(account, 1, idempotency_key=reused)
    again = await client.reserve(account, 1, idempotency_key=reused)
    assert again.reservation.reservation_id == first.reservation.reservation_id
    with pytest.raises(IdempotencyKeyReused) as caught:
        await client.reserve(account, 2, idempotency_key=reused)
    assert caught.value.field == "amount"
    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
    await client.release(account, first.reservation.reservation_id)


async def test_malformed_request_raises_invalid_argument_with_field_violations(
    client: CreditsClient,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.reserve("-bad account", 0, idempotency_key=key())
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert {"account_id", "amount"} <= set(error.fields)
    assert all(description for _, description in error.field_violations)


async def test_commit_above_reserved_raises_invalid_argument(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    reserved = await client.reserve(account, 3, idempotency_key=key())
    with pytest.raises(InvalidArgument) as caught:
        await client.commit(account, reserved.reservation.reservation_id, 4)
    assert caught.value.field_violations
    await client.release(account, reserved.reservation.reservation_id)


async def test_unknown_reservation_raises_not_found(
    client: CreditsClient, accounts: Accounts
) -> None:
    with pytest.raises(NotFound) as caught:
        await client.commit(accounts("a"), "res_000000000000nosuchreservation")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.message


async def test_commit_after_release_raises_reservation_state_error(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    reserved = await client.reserve(account, 3, idempotency_key=key())
    await client.release(account, reserved.reservation.reservation_id)
    with pytest.raises(ReservationStateError) as caught:
        await client.commit(account, reserved.reservation.reservation_id)
    assert caught.value.reason == "RESERVATION_RELEASED"
    assert caught.value.status == "released"
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION


async def test_release_after_commit_raises_reservation_state_error(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    reserved = await client.reserve(account, 3, idempotency_key=key())
    await client.commit(account, reserved.reservation.reservation_id)
    with pytest.raises(ReservationStateError) as caught:
        await client.release(account, reserved.reservation.reservation_id)
    assert (caught.value.reason, caught.value.status) == ("RESERVATION_COMMITTED", "committed")


async def test_deadline_exceeded_is_a_retryable_credits_error(
    client: CreditsClient, accounts: Accounts
) -> None:
    with pytest.raises(CreditsError) as caught:
        await client.check(accounts("a"), timeout_seconds=1e-6)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.retryable


async def test_timeout_must_be_positive_and_bounded(client: CreditsClient) -> None:
    for timeout_seconds in (0.0, -1.0, float("inf"), 301.0):
        with pytest.raises(ValueError, match="timeout_seconds"):
            await client.check("user:1", timeout_seconds=timeout_seconds)


async def test_unreachable_database_raises_unavailable_with_retry_delay() -> None:
    # Port 1 on localhost refuses connections: the server starts (reporting NOT_SERVING) and
    # answers every call with UNAVAILABLE + RetryInfo.
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
        sweep_interval_seconds=3600,
    )
    app = CreditsApp(config)
    port = await app.start()
    try:
        async with CreditsClient(f"127.0.0.1:{port}", token=TEST_TOKEN) as client:
            with pytest.raises(Unavailable) as caught:
                await client.check("user:1", consistent=True)
    finally:
        await app.stop(grace_seconds=0)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.retry_delay_seconds == 1.0
    assert caught.value.retryable


async def test_unreachable_server_raises_unavailable_without_retry_delay() -> None:
    async with CreditsClient("127.0.0.1:1") as client:
        with pytest.raises(Unavailable) as caught:
            await client.check("user:1", timeout_seconds=2)
    assert caught.value.retry_delay_seconds is None


def test_error_from_rpc_reads_retry_info_of_any_status() -> None:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(1500)
    detail = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="slow down")
    detail.details.add().Pack(retry)
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(
            ("grpc-status-details-bin", detail.SerializeToString()), ("x-request-id", "r1")
        ),
        "slow down",
        None,
    )
    error = error_from_rpc(rpc_error)
    assert type(error) is CreditsError
    assert (error.retry_delay_seconds, error.request_id, error.retryable) == (1.5, "r1", True)


# ---- metered -------------------------------------------------------------------------------


async def test_metered_commits_the_whole_hold_on_success(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    async with client.metered(account, 4, idempotency_key=key(), action="ai.chat") as hold:
        assert hold.amount == 4
        assert await available(client, account) == (6, 4)
    assert hold.committed is not None and hold.released is None
    assert hold.committed.reservation.amount_committed == 4
    assert hold.committed.reservation.action == "ai.chat"
    assert await available(client, account) == (6, 0)


async def test_metered_commits_actual_when_set(client: CreditsClient, accounts: Accounts) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    async with client.metered(account, 4, idempotency_key=key()) as hold:
        hold.actual = 1
    assert hold.committed is not None
    assert hold.committed.reservation.amount_committed == 1
    assert hold.committed.reservation.amount_released == 3
    assert await available(client, account) == (9, 0)


async def test_metered_releases_when_the_block_raises(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    with pytest.raises(RuntimeError, match="work failed"):
        async with client.metered(account, 4, idempotency_key=key()) as hold:
            raise RuntimeError("work failed")
    assert hold.released is not None and hold.committed is None
    assert hold.released.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert await available(client, account) == (10, 0)


async def test_metered_releases_when_the_block_is_cancelled(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    entered = asyncio.Event()
    holds: list[Hold] = []

    async def work() -> None:
        async with client.metered(account, 4, idempotency_key=key()) as hold:
            holds.append(hold)
            entered.set()
            await asyncio.Event().wait()  # the caller hangs up before this finishes

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holds[0].released is not None
    assert await available(client, account) == (10, 0)


async def test_metered_actual_above_the_hold_raises_and_releases(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 10)
    with pytest.raises(ValueError, match="actual"):
        async with client.metered(account, 4, idempotency_key=key()) as hold:
            hold.actual = 5
    assert hold.released is not None
    assert await available(client, account) == (10, 0)


async def test_metered_raises_insufficient_credits_before_the_block_runs(
    client: CreditsClient, accounts: Accounts
) -> None:
    account = accounts("a")
    await grant(client, account, 2)
    ran = False
    with pytest.raises(InsufficientCredits):
        async with client.metered(account, 3, idempotency_key=key()):
            ran = True
    assert not ran
    assert await available(client, account) == (2, 0)


async def test_client_locks_unlocks_and_claws_back(
    start_server: Any, sqlite_url: str, accounts: Callable[[str], str]
) -> None:
    server = await start_server(sqlite_url)
    account = accounts("admin")
    async with CreditsClient(server.address, token=TEST_TOKEN) as client:
        granted = await client.add_credits(account, 50, idempotency_key="g", source="purchase")
        assert (await client.set_account_status(account, locked=True, reason="review")).changed
        with pytest.raises(AccountLocked):
            await client.reserve(account, 1, idempotency_key="r")
        assert (await client.set_account_status(account, locked=False)).changed
        clawed = await client.claw_back(account, granted.grant.grant_id, 80, idempotency_key="c")
        assert (clawed.amount_clawed_back, clawed.shortfall) == (50, 30)
