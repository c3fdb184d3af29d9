"""Server configuration: CLI flags, each defaulting to an environment variable, then a default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from store import limits
from store.cache import REDIS_TIMEOUT_MS_DEFAULT

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///var/credits.db"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    log_level: str = "INFO"
    migrate_on_start: bool = False
    hold_ttl_seconds_default: int = limits.HOLD_TTL_SECONDS_DEFAULT
    hold_ttl_seconds_max: int = limits.HOLD_TTL_SECONDS_MAX_DEFAULT
    sweep_interval_seconds: float = 5.0
    health_probe_interval_seconds: float = 2.0
    shutdown_grace_seconds: float = 10.0
    db_pool_size: int = 10
    reflection: bool = True
    redis_url: str = ""
    redis_namespace: str = "credits:"
    redis_timeout_ms: int = REDIS_TIMEOUT_MS_DEFAULT


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credits-server",
        description="gRPC credits service. Every flag defaults to the environment variable named.",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "audit"],
        help="serve (default), migrate the database, or audit the journal",
    )
    p.add_argument(
        "--listen",
        default=_env("CREDITS_LISTEN", DEFAULT_LISTEN),
        help=f"host:port to serve on (CREDITS_LISTEN, default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--database-url",
        default=_env("CREDITS_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="postgresql://user@host/db or sqlite:///path (CREDITS_DATABASE_URL, "
        f"default {DEFAULT_DATABASE_URL})",
    )
    p.add_argument(
        "--log-level",
        default=_env("CREDITS_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (CREDITS_LOG_LEVEL, default INFO)",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        default=_flag(_env("CREDITS_MIGRATE_ON_START", "0")),
        help="apply migrations before serving (CREDITS_MIGRATE_ON_START=1)",
    )
    p.add_argument(
        "--hold-ttl-default-seconds",
        type=int,
        default=int(_env("CREDITS_HOLD_TTL_DEFAULT_SECONDS", str(limits.HOLD_TTL_SECONDS_DEFAULT))),
        help="TTL of a reservation that asks for none (CREDITS_HOLD_TTL_DEFAULT_SECONDS, "
        f"default {limits.HOLD_TTL_SECONDS_DEFAULT})",
    )
    p.add_argument(
        "--hold-ttl-max-seconds",
        type=int,
        default=int(_env("CREDITS_HOLD_TTL_MAX_SECONDS", str(limits.HOLD_TTL_SECONDS_MAX_DEFAULT))),
        help="longest TTL a caller may ask for (CREDITS_HOLD_TTL_MAX_SECONDS, default "
        f"{limits.HOLD_TTL_SECONDS_MAX_DEFAULT}, at most "
        f"{limits.HOLD_TTL_SECONDS_CEILING})",
    )
    p.add_argument(
        "--sweep-interval-seconds",
        type=float,
        default=float(_env("CREDITS_SWEEP_INTERVAL_SECONDS", "5")),
        help="pause between sweeper passes (CREDITS_SWEEP_INTERVAL_SECONDS, default 5)",
    )
    p.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=float(_env("CREDITS_SHUTDOWN_GRACE_SECONDS", "10")),
        help="how long in-flight calls may finish on SIGTERM (default 10)",
    )
    p.add_argument(
        "--db-pool-size",
        type=int,
        default=int(_env("CREDITS_DB_POOL_SIZE", "10")),
        help="database connections per process (CREDITS_DB_POOL_SIZE, default 10)",
    )
    p.add_argument(
        "--redis-url",
        default=_env("CREDITS_REDIS_URL", ""),
        help="redis://host:port/db for the balance cache (CREDITS_REDIS_URL); "
        "without it each process keeps its own in-process cache",
    )
    p.add_argument(
        "--redis-namespace",
        default=_env("CREDITS_REDIS_NAMESPACE", "credits:"),
        help="prefix of every cache key (CREDITS_REDIS_NAMESPACE, default credits:)",
    )
    p.add_argument(
        "--redis-timeout-ms",
        type=int,
        default=int(_env("CREDITS_REDIS_TIMEOUT_MS", str(REDIS_TIMEOUT_MS_DEFAULT))),
        help="give up on a cache call after this long and use the database "
        f"(CREDITS_REDIS_TIMEOUT_MS, default {REDIS_TIMEOUT_MS_DEFAULT})",
    )
    p.add_argument(
        "--no-reflection",
        action="store_true",
        default=_flag(_env("CREDITS_DISABLE_REFLECTION", "0")),
        help="do not serve gRPC reflection (CREDITS_DISABLE_REFLECTION=1)",
    )
    return p


def load(argv: list[str] | None = None) -> tuple[str, ServerConfig]:
    args = parser().parse_args(argv)
    config = ServerConfig(
        listen=args.listen,
        database_url=args.database_url,
        log_level=args.log_level,
        migrate_on_start=args.migrate,
        hold_ttl_seconds_default=args.hold_ttl_default_seconds,
        hold_ttl_seconds_max=args.hold_ttl_max_seconds,
        sweep_interval_seconds=args.sweep_interval_seconds,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        db_pool_size=args.db_pool_size,
        reflection=not args.no_reflection,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        redis_timeout_ms=args.redis_timeout_ms,
    )
    if not 1 <= config.redis_timeout_ms <= 5000:
        parser().error("--redis-timeout-ms must be between 1 and 5000")
    if not 0.05 <= config.sweep_interval_seconds <= 3600:
        parser().error("--sweep-interval-seconds must be between 0.05 and 3600")
    if not 1 <= config.db_pool_size <= 200:
        parser().error("--db-pool-size must be between 1 and 200")
    return str(args.command), config
