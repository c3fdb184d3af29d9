"""The listener's configuration: a TOML file for prices and policy, the environment for secrets.

Precedence for the three deployment settings (listen, credits_address, database_url): command
line flag, then environment variable, then the file, then the default. Signing secrets and the
Stripe API key come from the environment only; the loader refuses a file that holds them, so a
config file can be committed and reviewed like code. Every problem is reported at once.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

from billing import limits

DEFAULT_LISTEN: Final = "127.0.0.1:8080"
DEFAULT_CREDITS_ADDRESS: Final = "127.0.0.1:50051"
DEFAULT_DATABASE_URL: Final = "sqlite:///var/listener.db"
DEFAULT_STRIPE_API_BASE: Final = "https://api.stripe.com"

ENV_CONFIG: Final = "CREDITS_LISTENER_CONFIG"
ENV_LISTEN: Final = "CREDITS_LISTENER_LISTEN"
ENV_CREDITS_ADDRESS: Final = "CREDITS_LISTENER_CREDITS_ADDRESS"
ENV_DATABASE_URL: Final = "CREDITS_LISTENER_DATABASE_URL"
ENV_SIGNING_SECRETS: Final = "STRIPE_WEBHOOK_SECRETS"
ENV_API_KEY: Final = "STRIPE_API_KEY"
ENV_PURCHASE_TOKEN: Final = "CREDITS_LISTENER_PURCHASE_TOKEN"
# The listener's own bearer token for the credits server (a caller with credits.grant and
# credits.admin: AddCredits, ClawBack, SetAccountStatus; docs/auth.md).
ENV_CREDITS_TOKEN: Final = "CREDITS_LISTENER_TOKEN"

# Dispute statuses Stripe reports when a dispute closes.
DISPUTE_CLOSED_STATUSES: Final = frozenset({"won", "lost", "warning_closed", "prevented"})
_SECRET_KEYS: Final = frozenset(
    {
        "webhook_secret",
        "webhook_secrets",
        "signing_secret",
        "signing_secrets",
        "api_key",
        "token",
        "credits_token",
    }
)


_PriceT = TypeVar("_PriceT", "PackPrice", "PlanPrice")


class ConfigError(ValueError):
    """The configuration is unusable; the message lists every problem, one a line."""


@dataclass(frozen=True)
class PackPrice:
    """A one-time price that sells credits: each unit bought grants credits_per_unit."""

    price_id: str
    credits_per_unit: int
    credit_type: str


@dataclass(frozen=True)
class PlanPrice:
    """A recurring price: each paid period grants credits_per_period per seat, expiring at the
    period's end plus expiry_grace_seconds. No rollover: what is left expires with its period."""

    price_id: str
    credits_per_period: int
    credit_type: str
    expiry_grace_seconds: int


@dataclass(frozen=True)
class DisputePolicy:
    lock_on_created: bool = True
    # Closing statuses that unlock the account (when it has no other open dispute).
    unlock_on: frozenset[str] = frozenset({"won", "warning_closed"})


@dataclass(frozen=True)
class CheckoutUrls:
    success_url: str
    cancel_url: str


@dataclass(frozen=True)
class WorkerSettings:
    attempts_max: int = limits.ATTEMPTS_MAX_DEFAULT
    backoff_initial_seconds: float = limits.BACKOFF_INITIAL_SECONDS_DEFAULT
    backoff_max_seconds: float = limits.BACKOFF_MAX_SECONDS_DEFAULT
    poll_interval_seconds: float = limits.POLL_INTERVAL_SECONDS_DEFAULT
    retention_days: int = limits.RETENTION_DAYS_DEFAULT


@dataclass(frozen=True)
class ListenerConfig:
    listen_host: str
    listen_port: int
    credits_address: str
    database_url: str
    livemode: bool
    checkout: CheckoutUrls
    packs: Mapping[str, PackPrice]
    plans: Mapping[str, PlanPrice]
    disputes: DisputePolicy = DisputePolicy()
    worker: WorkerSettings = WorkerSettings()
    # Secrets: kept out of repr, so a logged config never carries them.
    signing_secrets: tuple[str, ...] = field(default=(), repr=False)
    stripe_api_key: str = field(default="", repr=False)
    stripe_api_base: str = DEFAULT_STRIPE_API_BASE
    purchase_token: str = field(default="", repr=False)
    credits_token: str = field(default="", repr=False)

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


@dataclass(frozen=True)
class Overrides:
    """Command-line values that win over the environment and the file."""

    listen: str | None = None
    credits_address: str | None = None
    database_url: str | None = None


def load(
    path: Path, environ: Mapping[str, str], overrides: Overrides = Overrides()
) -> ListenerConfig:
    """Reads and validates the file at `path`; secrets come from `environ`."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    problems: list[str] = []
    config = _build(_Table(document, "", problems), environ, overrides, problems)
    if problems:
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems))
    assert config is not None, "a config is built whenever no problem was found"
    return config


def _build(
    root: _Table, environ: Mapping[str, str], overrides: Overrides, problems: list[str]
) -> ListenerConfig | None:
    root.only({"listener", "checkout", "worker", "disputes", "packs", "plans"})
    listener = root.table("listener")
    listener.only({"listen", "credits_address", "database_url", "livemode", "stripe_api_base"})
    listen = _first(overrides.listen, environ.get(ENV_LISTEN), listener.text("listen", ""))
    host, port = _host_port(listen or DEFAULT_LISTEN, problems)
    livemode = listener.boolean("livemode", False)
    secrets = _signing_secrets(environ.get(ENV_SIGNING_SECRETS, ""), problems)
    api_key = environ.get(ENV_API_KEY, "").strip()
    _check_api_key_mode(api_key, livemode, problems)
    packs = _packs(root.tables("packs"), problems)
    plans = _plans(root.tables("plans"), problems)
    for price_id in sorted(set(packs) & set(plans)):
        problems.append(f"price {price_id!r} is both a pack and a plan")
    config = ListenerConfig(
        listen_host=host,
        listen_port=port,
        credits_address=_first(
            overrides.credits_address,
            environ.get(ENV_CREDITS_ADDRESS),
            listener.text("credits_address", ""),
        )
        or DEFAULT_CREDITS_ADDRESS,
        database_url=_first(
            overrides.database_url,
            environ.get(ENV_DATABASE_URL),
            listener.text("database_url", ""),
        )
        or DEFAULT_DATABASE_URL,
        livemode=livemode,
        checkout=_checkout(root.table("checkout")),
        packs=MappingProxyType(packs),
        plans=MappingProxyType(plans),
        disputes=_disputes(root.table("disputes")),
        worker=_worker(root.table("worker"), problems),
        signing_secrets=secrets,
        stripe_api_key=api_key,
        stripe_api_base=listener.text("stripe_api_base", DEFAULT_STRIPE_API_BASE),
        purchase_token=environ.get(ENV_PURCHASE_TOKEN, "").strip(),
        credits_token=environ.get(ENV_CREDITS_TOKEN, "").strip(),
    )
    return None if problems else config


def _first(*values: str | None) -> str:
    for value in values:
        if value:
            return value
    return ""


def _host_port(listen: str, problems: list[str]) -> tuple[str, int]:
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        problems.append(f"listen address {listen!r} is not host:port (port 0..65535)")
        return "", 0
    return host, int(port_text)


def _signing_secrets(raw: str, problems: list[str]) -> tuple[str, ...]:
    secrets = tuple(part.strip() for part in raw.split(",") if part.strip())
    if len(secrets) > limits.SIGNING_SECRETS_MAX:
        problems.append(
            f"{ENV_SIGNING_SECRETS} holds {len(secrets)} secrets; at most "
            f"{limits.SIGNING_SECRETS_MAX} (the current one and the one being rotated out)"
        )
    for secret in secrets:
        if not secret.startswith("whsec_"):
            problems.append(f"{ENV_SIGNING_SECRETS}: a signing secret starts with 'whsec_'")
    return secrets


def _check_api_key_mode(api_key: str, livemode: bool, problems: list[str]) -> None:
    # A test key against a live listener (or the reverse) would fetch line items from the other
    # mode's account and find nothing; refuse it at start-up instead.
    if not api_key:
        return
    key_is_live = "_live_" in api_key
    if key_is_live != livemode:
        key_mode, listener_mode = ("live", "test") if key_is_live else ("test", "live")
        problems.append(
            f"{ENV_API_KEY} is a {key_mode}-mode key but [listener] livemode is "
            f"{str(livemode).lower()} ({listener_mode} mode)"
        )


def _checkout(table: _Table) -> CheckoutUrls:
    table.only({"success_url", "cancel_url"})
    return CheckoutUrls(
        success_url=table.url("success_url", "http://localhost:3000/billing/success"),
        cancel_url=table.url("cancel_url", "http://localhost:3000/billing/cancel"),
    )


def _worker(table: _Table, problems: list[str]) -> WorkerSettings:
    table.only(
        {
            "attempts_max",
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "poll_interval_seconds",
            "retention_days",
        }
    )
    settings = WorkerSettings(
        attempts_max=table.integer(
            "attempts_max", limits.ATTEMPTS_MAX_DEFAULT, 1, limits.ATTEMPTS_MAX_CEILING
        ),
        backoff_initial_seconds=table.number(
            "backoff_initial_seconds",
            limits.BACKOFF_INITIAL_SECONDS_DEFAULT,
            limits.BACKOFF_SECONDS_FLOOR,
            limits.BACKOFF_SECONDS_CEILING,
        ),
        backoff_max_seconds=table.number(
            "backoff_max_seconds",
            limits.BACKOFF_MAX_SECONDS_DEFAULT,
            limits.BACKOFF_SECONDS_FLOOR,
            limits.BACKOFF_SECONDS_CEILING,
        ),
        poll_interval_seconds=table.number(
            "poll_interval_seconds",
            limits.POLL_INTERVAL_SECONDS_DEFAULT,
            limits.POLL_INTERVAL_SECONDS_MIN,
            limits.POLL_INTERVAL_SECONDS_MAX,
        ),
        retention_days=table.integer(
            "retention_days",
            limits.RETENTION_DAYS_DEFAULT,
            limits.RETENTION_DAYS_MIN,
            limits.RETENTION_DAYS_MAX,
        ),
    )
    if settings.backoff_max_seconds < settings.backoff_initial_seconds:
        problems.append("[worker] backoff_max_seconds is below backoff_initial_seconds")
    return settings


def _disputes(table: _Table) -> DisputePolicy:
    table.only({"lock_on_created", "unlock_on"})
    unlock_on = table.strings("unlock_on", ["won", "warning_closed"])
    for status in unlock_on:
        if status not in DISPUTE_CLOSED_STATUSES:
            table.problem(
                "unlock_on",
                f"{status!r} is not a closed dispute status "
                f"({', '.join(sorted(DISPUTE_CLOSED_STATUSES))})",
            )
    return DisputePolicy(
        lock_on_created=table.boolean("lock_on_created", True), unlock_on=frozenset(unlock_on)
    )


def _packs(tables: list[_Table], problems: list[str]) -> dict[str, PackPrice]:
    packs: dict[str, PackPrice] = {}
    for table in tables:
        table.only({"price", "credits_per_unit", "credit_type"})
        pack = PackPrice(
            price_id=table.price_id("price"),
            credits_per_unit=table.integer(
                "credits_per_unit", None, 1, limits.CREDITS_PER_UNIT_MAX
            ),
            credit_type=table.credit_type("credit_type"),
        )
        _add_price(packs, pack.price_id, pack, problems)
    return packs


def _plans(tables: list[_Table], problems: list[str]) -> dict[str, PlanPrice]:
    plans: dict[str, PlanPrice] = {}
    for table in tables:
        table.only({"price", "credits_per_period", "credit_type", "expiry_grace_seconds"})
        plan = PlanPrice(
            price_id=table.price_id("price"),
            credits_per_period=table.integer(
                "credits_per_period", None, 1, limits.CREDITS_PER_PERIOD_MAX
            ),
            credit_type=table.credit_type("credit_type"),
            expiry_grace_seconds=table.integer(
                "expiry_grace_seconds", 0, 0, limits.EXPIRY_GRACE_SECONDS_MAX
            ),
        )
        _add_price(plans, plan.price_id, plan, problems)
    return plans


def _add_price(
    prices: dict[str, _PriceT], price_id: str, price: _PriceT, problems: list[str]
) -> None:
    if price_id in prices:
        problems.append(f"price {price_id!r} is configured twice")
    elif len(prices) >= limits.PRICES_MAX:
        problems.append(f"more than {limits.PRICES_MAX} prices")
    elif price_id:
        prices[price_id] = price


class _Table:
    """A TOML table being validated; every getter records a problem instead of raising."""

    def __init__(self, data: Mapping[str, Any], name: str, problems: list[str]) -> None:
        self._data = data
        self._name = name
        self._problems = problems

    def problem(self, key: str, message: str) -> None:
        where = f"{self._name}.{key}" if self._name else key
        self._problems.append(f"{where}: {message}")

    def only(self, allowed: set[str]) -> None:
        for key in sorted(set(self._data) - allowed):
            if key in _SECRET_KEYS:
                self.problem(
                    key,
                    f"secrets never go in the file: set {ENV_SIGNING_SECRETS}, {ENV_API_KEY} "
                    f"and {ENV_CREDITS_TOKEN} in the environment",
                )
            elif key == "rollover_cap":
                self.problem(key, "rollover is not implemented: each period's credits expire")
            else:
                self.problem(key, f"unknown setting (known: {', '.join(sorted(allowed))})")

    def table(self, key: str) -> _Table:
        value = self._data.get(key, {})
        name = f"{self._name}.{key}" if self._name else key
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            value = {}
        return _Table(value, f"[{name}]" if not self._name else name, self._problems)

    def tables(self, key: str) -> list[_Table]:
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problem(key, f"must be an array of tables ([[{key}]])")
            return []
        return [
            _Table(item, f"[[{key}]] #{index + 1}", self._problems)
            for index, item in enumerate(value)
        ]

    def text(self, key: str, default: str) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {value!r}")
            return default
        return value

    def url(self, key: str, default: str) -> str:
        value = self.text(key, default)
        if not value.startswith(("https://", "http://")) or len(value) > limits.URL_LENGTH_MAX:
            self.problem(key, f"must be an http(s) URL of at most {limits.URL_LENGTH_MAX} bytes")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {value!r}")
            return default
        return value

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        value = self._data.get(key, default)
        if value is None:
            self.problem(key, f"is required (an integer {low}..{high})")
            return low
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(key, f"must be an integer {low}..{high}, got {value!r}")
            return low
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            self.problem(key, f"must be a number {low}..{high}, got {value!r}")
            return default
        return float(value)

    def strings(self, key: str, default: list[str]) -> list[str]:
        value = self._data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problem(key, f"must be an array of strings, got {value!r}")
            return default
        return list(value)

    def price_id(self, key: str) -> str:
        value = self.text(key, "")
        if not value.startswith("price_") or len(value) > limits.STRIPE_ID_LENGTH_MAX:
            self.problem(key, f"must be a Stripe price id (price_...), got {value!r}")
            return ""
        return value

    def credit_type(self, key: str) -> str:
        value = self.text(key, limits.CREDIT_TYPE_DEFAULT)
        if not (
            len(value) <= limits.CREDIT_TYPE_LENGTH_MAX
            and limits.CREDIT_TYPE_PATTERN.fullmatch(value)
        ):
            self.problem(
                key,
                f"must be 1..{limits.CREDIT_TYPE_LENGTH_MAX} characters of [a-z0-9_] starting "
                f"with a letter, got {value!r}",
            )
        return value
