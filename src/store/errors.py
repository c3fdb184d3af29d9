"""Errors the ledger raises. The server maps each class to one gRPC status (DESIGN.md table)."""

from __future__ import annotations

from dataclasses import dataclass


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(LedgerError):
    """Malformed or out-of-range input. Never stored under an idempotency key."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        assert violations, "an invalid request names at least one violation"
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class BusinessFailure(LedgerError):
    """A refusal that is a final answer: stored under the idempotency key like a success."""

    reason: str = ""

    def details(self) -> dict[str, str]:
        return {}


class InsufficientCredits(BusinessFailure):
    reason = "INSUFFICIENT_CREDITS"

    def __init__(self, account_id: str, credit_type: str, required: int, available: int) -> None:
        assert required > available >= 0
        self.account_id = account_id
        self.credit_type = credit_type
        self.required = required
        self.available = available
        super().__init__(
            f"account {account_id!r} needs {required} {credit_type} credits but has {available} "
            f"available ({required - available} short); add credits or reserve less"
        )

    def details(self) -> dict[str, str]:
        return {
            "account_id": self.account_id,
            "credit_type": self.credit_type,
            "required": str(self.required),
            "available": str(self.available),
            "shortfall": str(self.required - self.available),
        }


class AccountLocked(BusinessFailure):
    reason = "ACCOUNT_LOCKED"

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        super().__init__(
            f"account {account_id!r} is locked and cannot reserve credits; "
            "ask an administrator to unlock it"
        )

    def details(self) -> dict[str, str]:
        return {"account_id": self.account_id}


class BalanceLimitExceeded(BusinessFailure):
    reason = "BALANCE_LIMIT_EXCEEDED"

    def __init__(self, account_id: str, credit_type: str, balance: int, limit: int) -> None:
        self.account_id = account_id
        self.credit_type = credit_type
        self.balance = balance
        self.limit = limit
        super().__init__(
            f"wallet {account_id!r}/{credit_type} would hold more than {limit} credits "
            f"(it holds {balance}); grant less"
        )

    def details(self) -> dict[str, str]:
        return {"balance": str(self.balance), "limit": str(self.limit)}


class ReservationNotFound(LedgerError):
    def __init__(self, account_id: str, reservation_id: str) -> None:
        super().__init__(
            f"no reservation {reservation_id!r} for account {account_id!r}; "
            "check both ids as returned by Reserve"
        )


class GrantNotFound(LedgerError):
    def __init__(self, account_id: str, grant_id: str) -> None:
        super().__init__(
            f"no grant {grant_id!r} for account {account_id!r}; use the grant_id AddCredits "
            "returned"
        )


class ReservationStateConflict(LedgerError):
    """The reservation's state forbids the request (expired, committed, released)."""

    def __init__(self, reason: str, message: str, metadata: dict[str, str]) -> None:
        self.reason = reason
        self.metadata = metadata
        super().__init__(message)


class IdempotencyKeyReused(LedgerError):
    def __init__(self, key: str, field: str) -> None:
        self.key = key
        self.field = field
        super().__init__(
            f"idempotency key {key!r} was first used with a different {field}; "
            "use a new key for a new request"
        )


class StoreUnavailable(LedgerError):
    """The database could not be reached; nothing was changed."""
