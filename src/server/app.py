"""Wires the ledger, the gRPC server, health, reflection and the background loops together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import ServerConfig
from server.reflection_docs import DocumentedPool
from server.service import SERVICE_NAME, CreditsService, generic_handler
from store import limits
from store.cache import BalanceCache, LocalBalanceCache, RedisBalanceCache
from store.clock import Clock
from store.database import PoolSettings, create_engine
from store.errors import StoreUnavailable
from store.ledger import Ledger, LedgerSettings
from store.migrate import migrate

log = logging.getLogger("credits.server")

# A database ping slower than this counts as "unreachable" for the health service.
HEALTH_PING_TIMEOUT_SECONDS = 2.0
# On shutdown, closing the cache client or the database pool may take at most this long each.
CLOSE_TIMEOUT_SECONDS = 5.0


class CreditsApp:
    def __init__(self, config: ServerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.engine = create_engine(config.database_url, PoolSettings(size=config.db_pool_size))
        self.cache: BalanceCache = (
            RedisBalanceCache(
                config.redis_url,
                namespace=config.redis_namespace,
                timeout_ms=config.redis_timeout_ms,
            )
            if config.redis_url
            else LocalBalanceCache()
        )
        self.ledger = Ledger(
            self.engine,
            clock,
            LedgerSettings(
                hold_ttl_seconds_default=config.hold_ttl_seconds_default,
                hold_ttl_seconds_max=config.hold_ttl_seconds_max,
            ),
            cache=self.cache,
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limits.REQUEST_BYTES_MAX),
                # Refuse to share the port: two servers on one address is a deployment mistake.
                ("grpc.so_reuseport", 0),
            ]
        )
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        if self.config.migrate_on_start:
            await migrate(self.engine)
        self.server.add_generic_rpc_handlers((generic_handler(CreditsService(self.ledger)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                self.server,
                # Duck-typed: the adapter answers the lookups reflection makes (see its module).
                pool=DocumentedPool(),  # type: ignore[arg-type]
            )
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.config.listen}")
        await self._probe_database()
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="health-probe"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
        ]
        log.info("serving", extra={"fields": {"listen": self.config.listen, "port": self.port}})
        return self.port

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish within the grace period, then
        stops the background loops and closes the database pool."""
        grace = self.config.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Bounded: a connection left half-open by a network fault must not hold shutdown hostage.
        for name, closing in (
            ("cache", self.cache.close()),
            ("database pool", self.engine.dispose()),
        ):
            try:
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("closing the %s took over %s s; abandoned", name, CLOSE_TIMEOUT_SECONDS)
        log.info("stopped")

    async def _probe_database(self) -> bool:
        try:
            await asyncio.wait_for(self.ledger.ping(), HEALTH_PING_TIMEOUT_SECONDS)
            healthy = True
        except (StoreUnavailable, TimeoutError):
            healthy = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        return healthy

    async def _health_loop(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(self.config.health_probe_interval_seconds)
            now_healthy = await self._probe_database()
            if now_healthy != healthy:
                log.warning("database %s", "reachable again" if now_healthy else "unreachable")
                healthy = now_healthy

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_seconds)
            try:
                holds = await self.ledger.sweep_expired_holds()
                grants = await self.ledger.sweep_expired_grants()
                keys = await self.ledger.prune_idempotency_keys()
                if holds or grants or keys:
                    log.info(
                        "swept",
                        extra={
                            "fields": {
                                "holds_expired": holds,
                                "grants_expired": grants,
                                "keys_pruned": keys,
                            }
                        },
                    )
            except StoreUnavailable:
                log.warning("sweeper skipped a pass: database unavailable")
            except Exception:
                log.exception("sweeper pass failed")
