"""Python client library for the credits service."""

from credits_client.client import (
    DEFAULT_MAX_PAGES,
    DEFAULT_TIMEOUT_SECONDS,
    CreditsClient,
    entry_kind,
    grant_source,
)
from credits_client.errors import (
    AccountLocked,
    CreditsError,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReservationStateError,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)
from credits_client.metered import Hold, Metered

__all__ = [
    "DEFAULT_MAX_PAGES",
    "DEFAULT_TIMEOUT_SECONDS",
    "AccountLocked",
    "CreditsClient",
    "CreditsError",
    "Hold",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "InvalidArgument",
    "Metered",
    "NotFound",
    "PermissionDenied",
    "ReservationStateError",
    "Unauthenticated",
    "Unavailable",
    "entry_kind",
    "error_from_rpc",
    "grant_source",
]
