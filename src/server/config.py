"""Server configuration: CLI flags, each defaulting to an environment variable, then a default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from server.metrics import split_listen
from server.ratelimit import ENVIRONMENT_VARIABLES as RATE_ENVIRONMENT_VARIABLES
from server.ratelimit import RateLimitConfig
from store import limits
from store.cache import (
    NEAR_SNAPSHOT_TTL_MS_DEFAULT,
    NEAR_SNAPSHOT_TTL_MS_MAX,
    REDIS_TIMEOUT_MS_DEFAULT,
)

# RateLimitConfig's fields, each a --rate-<field> flag.
RATE_FIELDS = tuple(RATE_ENVIRONMENT_VARIABLES)

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
    # Reflection answers only callers with a valid credential (default: open to anyone).
    reflection_requires_auth: bool = False
    # How long a credential lookup is reused in process: revocation takes effect within it.
    auth_cache_ttl_seconds: float = limits.AUTH_CACHE_TTL_SECONDS_DEFAULT
    # TLS: the server's certificate chain and key (PEM files); empty: plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA (PEM) that client certificates must chain to; set: every client must present one.
    tls_client_ca_file: str = ""
    # Issue a token for the `dev` caller at start even when callers exist or on Postgres.
    dev_token: bool = False
    redis_url: str = ""
    redis_namespace: str = "credits:"
    redis_timeout_ms: int = REDIS_TIMEOUT_MS_DEFAULT
    # host:port of the Prometheus endpoint (GET /metrics); empty: not served.
    metrics_listen: str = ""
    metrics_refresh_interval_seconds: float = 15.0
    # OTLP gRPC endpoint for traces (http://collector:4317); empty: tracing off.
    otlp_endpoint: str = ""
    # Spend rate limits per caller and per account (docs/rate-limits.md).
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    # With Redis: how long each replica reuses a snapshot it read or wrote (0: always ask Redis).
    near_cache_ms: int = NEAR_SNAPSHOT_TTL_MS_DEFAULT
    # Postgres: how long a group-commit batch may wait to fill while the server is saturated.
    batch_fill_wait_ms: int = limits.BATCH_FILL_WAIT_MS_DEFAULT
    # Postgres: wallets whose state, as the batches wrote it, is kept so that the next Reserve
    # batch on them skips its read (0: none).
    wallet_copies: int = limits.WALLET_COPIES_DEFAULT


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
        help="serve (default), migrate the database, or audit the journal; "
        "`credits-server callers --help` manages callers and their tokens",
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
    p.add_argument(
        "--reflection-requires-auth",
        action="store_true",
        default=_flag(_env("CREDITS_REFLECTION_REQUIRES_AUTH", "0")),
        help="serve reflection only to callers with a valid credential "
        "(CREDITS_REFLECTION_REQUIRES_AUTH=1; default: open, so grpcurl list works)",
    )
    p.add_argument(
        "--auth-cache-ttl-seconds",
        type=float,
        default=float(
            _env("CREDITS_AUTH_CACHE_TTL_SECONDS", str(limits.AUTH_CACHE_TTL_SECONDS_DEFAULT))
        ),
        help="reuse a credential lookup for this long; a revoked token or a changed scope "
        "takes effect within it (CREDITS_AUTH_CACHE_TTL_SECONDS, default "
        f"{limits.AUTH_CACHE_TTL_SECONDS_DEFAULT:g}, 0..{limits.AUTH_CACHE_TTL_SECONDS_MAX:g})",
    )
    p.add_argument(
        "--tls-cert-file",
        default=_env("CREDITS_TLS_CERT_FILE", ""),
        help="PEM certificate chain to serve TLS with (CREDITS_TLS_CERT_FILE; with "
        "--tls-key-file; default: plaintext)",
    )
    p.add_argument(
        "--tls-key-file",
        default=_env("CREDITS_TLS_KEY_FILE", ""),
        help="PEM private key of --tls-cert-file (CREDITS_TLS_KEY_FILE)",
    )
    p.add_argument(
        "--tls-client-ca-file",
        default=_env("CREDITS_TLS_CLIENT_CA_FILE", ""),
        help="PEM CA bundle for client certificates (CREDITS_TLS_CLIENT_CA_FILE): every "
        "client must then present one; its SAN or CN may name the caller (docs/auth.md)",
    )
    p.add_argument(
        "--dev-token",
        action="store_true",
        default=_flag(_env("CREDITS_DEV_TOKEN", "0")),
        help="at start, give the 'dev' caller (all scopes) a fresh token and write it to "
        "var/dev-token (CREDITS_DEV_TOKEN=1). Done without asking on SQLite while no caller "
        "exists; never without asking on Postgres",
    )
    p.add_argument(
        "--metrics-listen",
        default=_env("CREDITS_METRICS_LISTEN", ""),
        help="host:port to serve Prometheus metrics on, at /metrics (CREDITS_METRICS_LISTEN, "
        "e.g. 0.0.0.0:9464; default: not served)",
    )
    p.add_argument(
        "--metrics-refresh-seconds",
        type=float,
        default=float(_env("CREDITS_METRICS_REFRESH_SECONDS", "15")),
        help="pause between reads of the reservation and sweeper gauges from the database "
        "(CREDITS_METRICS_REFRESH_SECONDS, default 15)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", _env("OTEL_EXPORTER_OTLP_ENDPOINT", "")),
        help="OTLP gRPC endpoint to send traces to, e.g. http://127.0.0.1:4317 "
        "(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; default: no "
        "tracing)",
    )
    p.add_argument(
        "--near-cache-ms",
        type=int,
        default=int(_env("CREDITS_NEAR_CACHE_MS", str(NEAR_SNAPSHOT_TTL_MS_DEFAULT))),
        help="with Redis, reuse a balance snapshot in process for this long, so a cached "
        "CheckCredits needs no round trip; a write through another replica may go unseen by "
        f"this one's cached reads that long (CREDITS_NEAR_CACHE_MS, default "
        f"{NEAR_SNAPSHOT_TTL_MS_DEFAULT}, 0 to {NEAR_SNAPSHOT_TTL_MS_MAX}; 0: off)",
    )
    p.add_argument(
        "--batch-fill-wait-ms",
        type=int,
        default=int(_env("CREDITS_BATCH_FILL_WAIT_MS", str(limits.BATCH_FILL_WAIT_MS_DEFAULT))),
        help="on Postgres, while the server is saturated (its event loop's thread on the CPU "
        # %% : argparse formats help texts with %.
        f"{limits.BATCH_FILL_CPU_SHARE_MIN * 100:.0f}%% of the time or more, right after a batch "
        f"of {limits.BATCH_FILL_AFTER_CALLS} calls or more), let a Reserve, Commit or Release "
        "batch wait this long for more calls: bigger batches cost less CPU per call "
        f"(CREDITS_BATCH_FILL_WAIT_MS, default {limits.BATCH_FILL_WAIT_MS_DEFAULT}, "
        f"0 to {limits.BATCH_FILL_WAIT_MS_MAX}; 0: never wait)",
    )
    p.add_argument(
        "--wallet-copies",
        type=int,
        default=int(_env("CREDITS_WALLET_COPIES", str(limits.WALLET_COPIES_DEFAULT))),
        help="on Postgres, keep the state the batches (Reserve, Commit, Release) last wrote for "
        "this many wallets, so the next Reserve on one of them skips a read (one round trip "
        "instead of two; the write still checks the wallet did not move). About 0.5 KB each "
        f"(CREDITS_WALLET_COPIES, default {limits.WALLET_COPIES_DEFAULT}, "
        f"0 to {limits.WALLET_COPIES_MAX}; 0: keep none)",
    )
    for name, variable in RATE_ENVIRONMENT_VARIABLES.items():
        default = getattr(RateLimitConfig(), name)
        p.add_argument(
            "--rate-" + name.replace("_", "-"),
            type=type(default),
            default=type(default)(_env(variable, str(default))),
            help=f"spend rate limit ({variable}, default {default:g}; 0: off; "
            "see docs/rate-limits.md)",
        )
    return p


def _rate_limits(args: argparse.Namespace) -> RateLimitConfig:
    try:
        return RateLimitConfig(**{name: getattr(args, "rate_" + name) for name in RATE_FIELDS})
    except ValueError as error:
        parser().error(str(error))


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
        reflection_requires_auth=args.reflection_requires_auth,
        auth_cache_ttl_seconds=args.auth_cache_ttl_seconds,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file,
        dev_token=args.dev_token,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        redis_timeout_ms=args.redis_timeout_ms,
        metrics_listen=args.metrics_listen,
        metrics_refresh_interval_seconds=args.metrics_refresh_seconds,
        otlp_endpoint=args.otlp_endpoint,
        rate_limits=_rate_limits(args),
        near_cache_ms=args.near_cache_ms,
        batch_fill_wait_ms=args.batch_fill_wait_ms,
        wallet_copies=args.wallet_copies,
    )
    if not 0 <= config.near_cache_ms <= NEAR_SNAPSHOT_TTL_MS_MAX:
        parser().error(f"--near-cache-ms must be between 0 and {NEAR_SNAPSHOT_TTL_MS_MAX}")
    if not 0 <= config.batch_fill_wait_ms <= limits.BATCH_FILL_WAIT_MS_MAX:
        parser().error(
            f"--batch-fill-wait-ms must be between 0 and {limits.BATCH_FILL_WAIT_MS_MAX}"
        )
    if not 0 <= config.wallet_copies <= limits.WALLET_COPIES_MAX:
        parser().error(f"--wallet-copies must be between 0 and {limits.WALLET_COPIES_MAX}")
    if not 1 <= config.redis_timeout_ms <= 5000:
        parser().error("--redis-timeout-ms must be between 1 and 5000")
    if not 0.05 <= config.sweep_interval_seconds <= 3600:
        parser().error("--sweep-interval-seconds must be between 0.05 and 3600")
    if not 1 <= config.db_pool_size <= 200:
        parser().error("--db-pool-size must be between 1 and 200")
    if config.metrics_listen:
        try:
            split_listen(config.metrics_listen)
        except ValueError as error:
            parser().error(f"--metrics-listen: {error}")
    if not 1 <= config.metrics_refresh_interval_seconds <= 3600:
        parser().error("--metrics-refresh-seconds must be between 1 and 3600")
    if not 0 <= config.auth_cache_ttl_seconds <= limits.AUTH_CACHE_TTL_SECONDS_MAX:
        parser().error(
            f"--auth-cache-ttl-seconds must be between 0 and {limits.AUTH_CACHE_TTL_SECONDS_MAX:g}"
        )
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        parser().error("--tls-cert-file and --tls-key-file go together")
    if config.tls_client_ca_file and not config.tls_cert_file:
        parser().error("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    return str(args.command), config
