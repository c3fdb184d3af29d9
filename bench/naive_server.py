"""The naive-service ceiling: a grpc.aio Reserve that runs only the bare reserve SQL.

One transaction through an asyncpg pool: a conditional UPDATE of the wallet (enough available?)
and one INSERT of the hold. No validation, no idempotency, no burn-down, no journal, no cache.
It works on its own two tables (NAIVE_SCHEMA, created and filled by bench/seed.py), so it never
touches the ledger's tables and the journal audit stays meaningful.

    .venv/bin/python bench/naive_server.py --listen 127.0.0.1:50198 --database-url postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

# gRPC's C core as credits-server runs it (src/server/grpc_core.py), set before grpc loads:
# the ceilings measure the same gRPC as the server they are ceilings for.
from server import grpc_core as _grpc_core  # noqa: F401  # isort: skip
import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credits_pb2 as pb
from credits.v1 import credits_pb2_grpc as pb_grpc

NAIVE_SCHEMA = """
CREATE TABLE naive_wallets (
    account_id  varchar(128) NOT NULL,
    credit_type varchar(32)  NOT NULL,
    available   bigint       NOT NULL CHECK (available >= 0),
    reserved    bigint       NOT NULL CHECK (reserved >= 0),
    PRIMARY KEY (account_id, credit_type)
);
CREATE TABLE naive_holds (
    account_id      varchar(128) NOT NULL,
    hold_id         bigint GENERATED ALWAYS AS IDENTITY,
    credit_type     varchar(32)  NOT NULL,
    amount          bigint       NOT NULL,
    idempotency_key varchar(128) NOT NULL,
    created_at_us   bigint       NOT NULL,
    expires_at_us   bigint       NOT NULL,
    PRIMARY KEY (account_id, hold_id)
);
"""

RESERVE_SQL = """
UPDATE naive_wallets SET available = available - $3, reserved = reserved + $3
WHERE account_id = $1 AND credit_type = $2 AND available >= $3
RETURNING available, reserved
"""
HOLD_SQL = """
INSERT INTO naive_holds (account_id, credit_type, amount, idempotency_key, created_at_us,
                         expires_at_us)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING hold_id
"""

Context = grpc.aio.ServicerContext[Any, Any]


class NaiveCredits(pb_grpc.CreditsServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def Reserve(self, request: Any, context: Context) -> pb.ReserveResponse:  # noqa: N802
        credit_type = request.credit_type or "default"
        now_us = time.time_ns() // 1000
        expires_us = now_us + (request.ttl_seconds or 300) * 1_000_000
        async with self.pool.acquire() as conn, conn.transaction():
            wallet = await conn.fetchrow(
                RESERVE_SQL, request.account_id, credit_type, request.amount
            )
            if wallet is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "insufficient credits")
            hold_id = await conn.fetchval(
                HOLD_SQL,
                request.account_id,
                credit_type,
                request.amount,
                request.idempotency_key,
                now_us,
                expires_us,
            )
        created = Timestamp()
        created.FromMicroseconds(now_us)
        expires = Timestamp()
        expires.FromMicroseconds(expires_us)
        reservation_id = f"rsv_{hold_id:032x}"
        return pb.ReserveResponse(
            reservation=pb.Reservation(
                reservation_id=reservation_id,
                account_id=request.account_id,
                credit_type=credit_type,
                amount=request.amount,
                status=pb.RESERVATION_STATUS_PENDING,
                created_at=created,
                expires_at=expires,
                action=request.action,
            ),
            entry=pb.JournalEntry(
                account_id=request.account_id,
                credit_type=credit_type,
                kind=pb.ENTRY_KIND_RESERVE,
                available_after=wallet["available"],
                reserved_after=wallet["reserved"],
                balance_after=wallet["available"] + wallet["reserved"],
                reservation_id=reservation_id,
                created_at=created,
            ),
        )


async def serve(listen: str, database_url: str, pool_size: int) -> None:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=pool_size,
        max_size=pool_size,
        server_settings={"application_name": "bench-naive", "synchronous_commit": "on"},
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # Only Reserve is implemented; the other RPCs answer UNIMPLEMENTED.
    servicer = NaiveCredits(pool)  # type: ignore[abstract]
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
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50198")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    coroutine = serve(args.listen, args.database_url, args.pool_size)
    if args.uvloop:
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


if __name__ == "__main__":
    main()
