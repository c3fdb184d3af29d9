"""One listener process: the HTTP server and the worker, sharing the inbox database."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from billing import http_api
from billing.config import ENV_CREDITS_TOKEN, ListenerConfig
from billing.credits_gateway import CreditsGateway, open_channel
from billing.database import create_engine
from billing.inbox import Inbox
from billing.metrics import ListenerMetrics
from billing.migrate import migrate
from billing.processor import Processor
from billing.records import Records
from billing.stripe_api import StripeApi
from billing.worker import Worker

log = logging.getLogger("credits.listener")


class ListenerApp:
    def __init__(self, config: ListenerConfig, *, migrate_on_start: bool = False) -> None:
        if not config.signing_secrets:
            raise ValueError(
                "no signing secrets: set STRIPE_WEBHOOK_SECRETS (whsec_..., comma-separated)"
            )
        self.config = config
        self._migrate_on_start = migrate_on_start
        self.engine = create_engine(config.database_url)
        self.inbox = Inbox(self.engine)
        self.records = Records(self.engine)
        self._channel = open_channel(config.credits_address)
        self._stripe_api = (
            StripeApi(config.stripe_api_key, config.stripe_api_base)
            if config.stripe_api_key
            else None
        )
        if not config.credits_token:
            log.warning(
                "%s is not set: the credits server will refuse the listener's calls "
                "(UNAUTHENTICATED) and events will wait, then park (docs/auth.md)",
                ENV_CREDITS_TOKEN,
            )
        gateway = CreditsGateway(self._channel, config.credits_token)
        processor = Processor(config, gateway, self.records, self._stripe_api)
        self.metrics = ListenerMetrics()
        self.worker = Worker(self.inbox, processor, config.worker, self.metrics)
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._worker_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Serves HTTP and starts the worker; returns the port (useful when configured as 0)."""
        if self._migrate_on_start:
            await migrate(self.engine)
        app = http_api.build(
            self.config, self.inbox, self.worker.wake, self._stripe_api, self.metrics
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_host, self.config.listen_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._worker_task = asyncio.create_task(self.worker.run(self._stop), name="worker")
        log.info(
            "listening",
            extra={
                "fields": {
                    "address": f"{self.config.listen_host}:{self.port}",
                    "credits_address": self.config.credits_address,
                    "livemode": self.config.livemode,
                    "stripe_api": self._stripe_api is not None,
                }
            },
        )
        return self.port

    async def stop(self) -> None:
        """Stops taking deliveries, lets the worker finish its event, closes everything."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._stop.set()
        if self._worker_task is not None:
            await self._worker_task
        if self._stripe_api is not None:
            await self._stripe_api.close()
        await self._channel.close(grace=None)
        await self.engine.dispose()
