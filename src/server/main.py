"""`credits-server`: serve (default), migrate, audit, or manage callers (`callers ...`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

import uvloop

from server import callers_cli, logs
from server import config as config_module
from server.app import CreditsApp
from server.config import ServerConfig
from store import audit_cli
from store.database import create_engine
from store.migrate import current_revision, migrate

log = logging.getLogger("credits.server")


async def serve(config: ServerConfig) -> None:
    app = CreditsApp(config)
    await app.start()
    # Everything loaded so far (modules, descriptors, the app) lives as long as the process:
    # out of the collector's sight, a full collection no longer scans it, which kept showing
    # as tens of milliseconds of pause in the p99 of fast reads.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.stop()


async def run_migrate(config: ServerConfig) -> None:
    engine = create_engine(config.database_url)
    try:
        await migrate(engine)
        log.info("migrated", extra={"fields": {"revision": await current_revision(engine)}})
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["callers"]:
        # Its own subcommands and flags (server/callers_cli.py); nothing here is served.
        sys.exit(callers_cli.main(arguments[1:]))
    command, config = config_module.load(arguments)
    logs.configure(config.log_level)
    if command == "migrate":
        asyncio.run(run_migrate(config))
    elif command == "audit":
        sys.exit(asyncio.run(audit_cli.run(config.database_url)))
    else:
        # uvloop: a faster event loop for the serving process (the hot path is loop-bound).
        uvloop.run(serve(config))


if __name__ == "__main__":
    main()
