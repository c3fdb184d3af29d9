"""The CreditsService handlers: decode, call the ledger, encode. No rules live here."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from credits.v1 import credits_pb2 as pb
from server import convert, metrics
from server.auth import METHOD_SCOPES
from server.handling import Call, CallPolicy, decoder, run_rpc
from server.handling import log as rpc_log
from store.cache import AccountSnapshot, WalletSnapshot
from store.history import read_history
from store.ledger import Ledger, balance_of
from store.model import Caller

# CheckCredits answers kept for reuse (CreditsService._check_in_memory); past this many the
# memo starts over. A few MB at most.
CHECK_ANSWERS_MAX = 10_000
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CreditsService"].full_name
Context = grpc.aio.ServicerContext[Any, Any]


def _caller(call: Call, action: str = "", caller_request_id: str = "") -> Caller:
    # The authenticated caller's name is the journal's principal.
    return Caller(
        principal=call.caller.name,
        action=action,
        request_id=caller_request_id or call.request_id,
    )


class CreditsService:
    def __init__(self, ledger: Ledger, policy: CallPolicy) -> None:
        self.ledger = ledger
        self.policy = policy
        # CheckCredits calls answered by _check_in_memory (the rest took run_rpc), and those of
        # them answered with a message kept from an earlier call.
        self.checks_answered_in_memory = 0
        self.checks_answered_from_memo = 0
        self._check_answers: dict[
            tuple[str, str, int], tuple[WalletSnapshot, AccountSnapshot, pb.CheckCreditsResponse]
        ] = {}

    async def CheckCredits(self, request: object, context: Context) -> pb.CheckCreditsResponse:  # noqa: N802
        answered = self._check_in_memory(request, context)
        if answered is not None:
            return answered

        async def work(r: pb.CheckCreditsRequest, call: Call) -> pb.CheckCreditsResponse:
            balance = await self.ledger.check(
                r.account_id, convert.credit_type(r.credit_type), r.amount, consistent=r.consistent
            )
            return convert.check_response(balance, r.amount)

        return await run_rpc("CheckCredits", request, context, self.policy, work)

    def _check_in_memory(self, request: object, context: Context) -> pb.CheckCreditsResponse | None:
        """The hot read, answered without awaiting anything when every step of it is a hit in
        this process's memory: the credential (Authenticator.authorize_in_memory) and the
        balance (Ledger.check_in_memory). Anything else (a miss, an error to report, a
        consistent read, debug logging on) returns None and takes run_rpc, which gives the
        same answer for eight times the Python (docs/performance.md)."""
        if (
            type(request) is not pb.CheckCreditsRequest
            or request.consistent
            or rpc_log.isEnabledFor(logging.DEBUG)  # run_rpc logs every call at DEBUG
        ):
            return None
        started = time.perf_counter()
        caller = self.policy.authenticator.authorize_in_memory(
            "CheckCredits", request.account_id, tuple(context.invocation_metadata() or ())
        )
        if caller is None:
            return None
        account_id, credit_type, amount = (
            request.account_id,
            convert.credit_type(request.credit_type),
            request.amount,
        )
        found = self.ledger.snapshots_in_memory(account_id, credit_type, amount)
        if found is None:
            return None
        # The same snapshots answer the same amount with the same message: reuse it while this
        # process holds them (gRPC only reads a returned message, to serialize it). Compared by
        # value: the cache builds new snapshot objects on every read (store/cache.py keeps plain
        # tuples), and comparing costs a tenth of building the message.
        key = (account_id, credit_type, amount)
        memo = self._check_answers.get(key)
        if memo is not None and memo[0] == found[0] and memo[1] == found[1]:
            response = memo[2]
            self.checks_answered_from_memo += 1
        else:
            balance = balance_of(account_id, credit_type, *found, from_cache=True)
            response = convert.check_response(balance, amount)
            if len(self._check_answers) >= CHECK_ANSWERS_MAX:
                self._check_answers.clear()
            self._check_answers[key] = (*found, response)
        self.checks_answered_in_memory += 1
        metrics.observe_rpc("CheckCredits", "OK", time.perf_counter() - started)
        return response

    async def Reserve(self, request: object, context: Context) -> pb.ReserveResponse:  # noqa: N802
        async def work(r: pb.ReserveRequest, call: Call) -> pb.ReserveResponse:
            result = await self.ledger.reserve(
                convert.reserve_command(r), _caller(call, r.action, r.request_id)
            )
            return pb.ReserveResponse(
                reservation=convert.reservation_message(result.reservation),
                entry=convert.entry_message(result.entry),
            )

        return await run_rpc("Reserve", request, context, self.policy, work)

    async def Commit(self, request: object, context: Context) -> pb.CommitResponse:  # noqa: N802
        async def work(r: pb.CommitRequest, call: Call) -> pb.CommitResponse:
            result = await self.ledger.commit(convert.commit_command(r), _caller(call))
            return pb.CommitResponse(
                reservation=convert.reservation_message(result.reservation),
                entry=convert.entry_message(result.entry),
            )

        return await run_rpc("Commit", request, context, self.policy, work)

    async def Release(self, request: object, context: Context) -> pb.ReleaseResponse:  # noqa: N802
        async def work(r: pb.ReleaseRequest, call: Call) -> pb.ReleaseResponse:
            result = await self.ledger.release(convert.release_command(r), _caller(call))
            return pb.ReleaseResponse(
                reservation=convert.reservation_message(result.reservation),
                entry=convert.entry_message(result.entry),
            )

        return await run_rpc("Release", request, context, self.policy, work)

    async def AddCredits(self, request: object, context: Context) -> pb.AddCreditsResponse:  # noqa: N802
        async def work(r: pb.AddCreditsRequest, call: Call) -> pb.AddCreditsResponse:
            result = await self.ledger.add_credits(
                convert.add_credits_command(r), _caller(call, r.action, r.request_id)
            )
            return pb.AddCreditsResponse(
                grant=convert.grant_message(result.grant), entry=convert.entry_message(result.entry)
            )

        return await run_rpc("AddCredits", request, context, self.policy, work)

    async def History(self, request: object, context: Context) -> pb.HistoryResponse:  # noqa: N802
        async def work(r: pb.HistoryRequest, call: Call) -> pb.HistoryResponse:
            page = await read_history(self.ledger.transactor, convert.history_query(r))
            return convert.history_response(page)

        return await run_rpc("History", request, context, self.policy, work)

    async def SetAccountStatus(  # noqa: N802
        self, request: object, context: Context
    ) -> pb.SetAccountStatusResponse:
        async def work(r: pb.SetAccountStatusRequest, call: Call) -> pb.SetAccountStatusResponse:
            change = await self.ledger.set_account_status(
                r.account_id, convert.account_status(r), r.reason, _caller(call)
            )
            return pb.SetAccountStatusResponse(
                account_id=change.account_id,
                status=convert.ACCOUNT_STATUS_TO_PB[change.status],
                changed=change.changed,
            )

        return await run_rpc("SetAccountStatus", request, context, self.policy, work)

    async def ClawBack(self, request: object, context: Context) -> pb.ClawBackResponse:  # noqa: N802
        async def work(r: pb.ClawBackRequest, call: Call) -> pb.ClawBackResponse:
            result = await self.ledger.claw_back(
                convert.claw_back_command(r), _caller(call, r.action, r.request_id)
            )
            return convert.claw_back_response(result)

        return await run_rpc("ClawBack", request, context, self.policy, work)


_METHODS: dict[str, tuple[Any, Any]] = {
    "CheckCredits": (pb.CheckCreditsRequest, pb.CheckCreditsResponse),
    "Reserve": (pb.ReserveRequest, pb.ReserveResponse),
    "Commit": (pb.CommitRequest, pb.CommitResponse),
    "Release": (pb.ReleaseRequest, pb.ReleaseResponse),
    "AddCredits": (pb.AddCreditsRequest, pb.AddCreditsResponse),
    "History": (pb.HistoryRequest, pb.HistoryResponse),
    "SetAccountStatus": (pb.SetAccountStatusRequest, pb.SetAccountStatusResponse),
    "ClawBack": (pb.ClawBackRequest, pb.ClawBackResponse),
}


def generic_handler(service: CreditsService) -> grpc.GenericRpcHandler[Any, Any]:
    """Like the generated add_CreditsServiceServicer_to_server, but with a decoder that turns
    undecodable bytes into INVALID_ARGUMENT."""
    assert set(_METHODS) <= set(METHOD_SCOPES), "every RPC needs a scope in server/auth.py"
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=decoder(request_class),
            response_serializer=response_class.SerializeToString,
        )
        for name, (request_class, response_class) in _METHODS.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
