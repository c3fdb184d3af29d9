"""The gRPC ceiling: a grpc.aio server implementing CreditsService with canned replies.

It decodes each request and serializes a fixed, realistic reply, and does nothing else: no
database, no cache, no validation. What a real handler can reach is bounded by this.

    .venv/bin/python bench/noop_server.py --listen 127.0.0.1:50199
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

# gRPC's C core as credits-server runs it (src/server/grpc_core.py), set before grpc loads:
# the ceilings measure the same gRPC as the server they are ceilings for.
from server import grpc_core as _grpc_core  # noqa: F401  # isort: skip
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_NOW = Timestamp(seconds=1_800_000_000)


def _entry(kind: int, sequence: int) -> pb.JournalEntry:
    return pb.JournalEntry(
        account_id="bench:0000001",
        credit_type="default",
        sequence=sequence,
        kind=kind,  # type: ignore[arg-type]
        amount=0,
        available_after=999_999,
        reserved_after=1,
        balance_after=1_000_000,
        reservation_id="rsv_0000000000000000000000000000",
        principal="anonymous",
        created_at=_NOW,
        grant_effects=[pb.GrantEffect(grant_id="grt_0000000000000000000000000000", held_delta=1)],
    )


def _reservation(status: int) -> pb.Reservation:
    return pb.Reservation(
        reservation_id="rsv_0000000000000000000000000000",
        account_id="bench:0000001",
        credit_type="default",
        amount=1,
        status=status,  # type: ignore[arg-type]
        created_at=_NOW,
        expires_at=_NOW,
        slices=[pb.ReservationSlice(grant_id="grt_0000000000000000000000000000", amount=1)],
    )


CHECK = pb.CheckCreditsResponse(
    allowed=True,
    available=999_999,
    reserved=1,
    balance=1_000_000,
    account_status=pb.ACCOUNT_STATUS_ACTIVE,
    as_of=_NOW,
    cached=True,
)
RESERVE = pb.ReserveResponse(
    reservation=_reservation(pb.RESERVATION_STATUS_PENDING), entry=_entry(pb.ENTRY_KIND_RESERVE, 2)
)
COMMIT = pb.CommitResponse(
    reservation=_reservation(pb.RESERVATION_STATUS_COMMITTED), entry=_entry(pb.ENTRY_KIND_COMMIT, 3)
)
RELEASE = pb.ReleaseResponse(
    reservation=_reservation(pb.RESERVATION_STATUS_RELEASED), entry=_entry(pb.ENTRY_KIND_RELEASE, 3)
)
ADD = pb.AddCreditsResponse(
    grant=pb.Grant(grant_id="grt_0000000000000000000000000000", amount=1, remaining=1),
    entry=_entry(pb.ENTRY_KIND_GRANT, 4),
)
HISTORY = pb.HistoryResponse(entries=[_entry(pb.ENTRY_KIND_RESERVE, n) for n in range(1, 11)])


class NoopCredits(pb_grpc.CreditsServiceServicer):
    async def CheckCredits(self, request: Any, context: Context) -> pb.CheckCreditsResponse:  # noqa: N802
        return CHECK

    async def Reserve(self, request: Any, context: Context) -> pb.ReserveResponse:  # noqa: N802
        return RESERVE

    async def Commit(self, request: Any, context: Context) -> pb.CommitResponse:  # noqa: N802
        return COMMIT

    async def Release(self, request: Any, context: Context) -> pb.ReleaseResponse:  # noqa: N802
        return RELEASE

    async def AddCredits(self, request: Any, context: Context) -> pb.AddCreditsResponse:  # noqa: N802
        return ADD

    async def History(self, request: Any, context: Context) -> pb.HistoryResponse:  # noqa: N802
        return HISTORY


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # RPCs not implemented here (the admin ones) answer UNIMPLEMENTED.
    servicer = NoopCredits()  # type: ignore[abstract]
    pb_grpc.add_CreditsServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50199")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.listen))
    else:
        asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
