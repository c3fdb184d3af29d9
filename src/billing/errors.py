"""How processing an event can fail, which decides what the worker does next."""

from __future__ import annotations


class ProcessingError(Exception):
    """An event could not be processed this time; the message says why, for the inbox."""


class RetryLater(ProcessingError):
    """Transient: the credits server or Stripe's API is unreachable, or an event this one
    depends on has not been processed yet. Retried with backoff, parked after the last try."""


class Refused(ProcessingError):
    """Permanent: retrying the same event with the same configuration cannot succeed (a price
    that is not configured, a request the credits server rejects). Parked at once, for ops to
    fix the cause and replay."""
