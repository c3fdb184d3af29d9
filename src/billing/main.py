"""`credits-listener`: serve (default), migrate, stats, parked, replay EVENT_ID."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from billing import config as config_module
from billing import logs
from billing.app import ListenerApp
from billing.config import ConfigError, ListenerConfig, Overrides
from billing.database import create_engine
from billing.inbox import Inbox, ReplayRefused
from billing.migrate import current_revision, migrate

DEFAULT_CONFIG_PATH = "billing.toml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credits-listener",
        description="Stripe webhook listener that turns payments into credits. Prices and "
        "policy come from the config file; secrets from STRIPE_WEBHOOK_SECRETS and "
        "STRIPE_API_KEY.",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "stats", "parked", "replay"],
        help="serve (default); migrate the listener's database; stats: events per status; "
        "parked: list parked events; replay EVENT_ID: put a parked event back in line",
    )
    p.add_argument("event_id", nargs="?", help="for replay: the parked event's id (evt_...)")
    p.add_argument(
        "--config",
        default=os.environ.get(config_module.ENV_CONFIG, DEFAULT_CONFIG_PATH),
        help=f"TOML config file ({config_module.ENV_CONFIG}, default {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "--listen",
        help=f"host:port for HTTP ({config_module.ENV_LISTEN}, the file, or "
        f"{config_module.DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--credits-address",
        help=f"credits server host:port ({config_module.ENV_CREDITS_ADDRESS}, the file, or "
        f"{config_module.DEFAULT_CREDITS_ADDRESS})",
    )
    p.add_argument(
        "--database-url",
        help=f"the listener's database ({config_module.ENV_DATABASE_URL}, the file, or "
        f"{config_module.DEFAULT_DATABASE_URL})",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="serve: apply the listener's migrations first",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("CREDITS_LISTENER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        config = config_module.load(
            Path(args.config),
            os.environ,
            Overrides(
                listen=args.listen,
                credits_address=args.credits_address,
                database_url=args.database_url,
            ),
        )
    except ConfigError as error:
        sys.exit(f"credits-listener: configuration refused:\n{error}")
    logs.configure(args.log_level)
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "serve": lambda: serve(config, migrate_on_start=args.migrate),
        "migrate": lambda: run_migrate(config),
        "stats": lambda: stats(config),
        "parked": lambda: list_parked(config),
        "replay": lambda: replay(config, args.event_id),
    }
    try:
        sys.exit(asyncio.run(commands[args.command]()))
    except SQLAlchemyError as error:
        sys.exit(
            f"credits-listener {args.command}: the listener database is unreachable or not "
            f"migrated (run `credits-listener migrate`): {type(error).__name__}: "
            f"{str(error).splitlines()[0]}"
        )


async def serve(config: ListenerConfig, *, migrate_on_start: bool) -> int:
    try:
        app = ListenerApp(config, migrate_on_start=migrate_on_start)
    except ValueError as error:
        print(f"credits-listener: {error}", file=sys.stderr)
        return 2
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.stop()
    return 0


async def run_migrate(config: ListenerConfig) -> int:
    engine = create_engine(config.database_url)
    try:
        await migrate(engine)
        print(f"listener database at revision {await current_revision(engine)}")
    finally:
        await engine.dispose()
    return 0


async def stats(config: ListenerConfig) -> int:
    engine = create_engine(config.database_url)
    try:
        inbox = Inbox(engine)
        for status, count in (await inbox.counts()).items():
            print(f"{status:8} {count}")
        for event_type, count in (await inbox.ignored_by_type()).items():
            print(f"ignored  {event_type}: {count}")
    finally:
        await engine.dispose()
    return 0


async def list_parked(config: ListenerConfig) -> int:
    engine = create_engine(config.database_url)
    try:
        parked = await Inbox(engine).parked()
    finally:
        await engine.dispose()
    if not parked:
        print("no parked events")
    for event in parked:
        received = datetime.fromtimestamp(event.received_at_us / 1e6, UTC).isoformat()
        print(
            f"{event.event_id}  {event.event_type}  received {received}  attempts {event.attempts}"
        )
        print(f"    {event.last_error}")
    return 0


async def replay(config: ListenerConfig, event_id: str | None) -> int:
    if not event_id:
        print("credits-listener replay: name the parked event (evt_...)", file=sys.stderr)
        return 2
    engine = create_engine(config.database_url)
    try:
        event = await Inbox(engine).replay(event_id)
    except ReplayRefused as error:
        print(f"credits-listener replay: {error}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    print(
        f"{event.event_id} ({event.event_type}) is pending again; the running listener's worker "
        "processes it within its poll interval"
    )
    return 0


if __name__ == "__main__":
    main()
