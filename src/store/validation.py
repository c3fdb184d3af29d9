"""Checks every command against the limits before anything touches the database.

Each check appends a FieldViolation rather than raising, so a caller sees every problem at once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from store import limits
from store.errors import FieldViolation, InvalidRequest
from store.model import (
    AddCreditsCommand,
    Caller,
    ClawBackCommand,
    CommitCommand,
    HistoryQuery,
    ReleaseCommand,
    ReserveCommand,
)


class Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidRequest(self.items)


def _check_text(
    v: Violations,
    field: str,
    value: str,
    *,
    length_max: int,
    pattern: re.Pattern[str] | None,
    required: bool,
    rule: str,
) -> None:
    if not value:
        if required:
            v.add(field, f"is required ({rule})")
        return
    if len(value) > length_max:
        v.add(field, f"is {len(value)} characters long; at most {length_max} allowed")
        return
    if pattern is not None and pattern.fullmatch(value) is None:
        v.add(field, f"{value[:40]!r} is not allowed; expected {rule}")


def check_account_id(v: Violations, value: str, field: str = "account_id") -> None:
    _check_text(
        v,
        field,
        value,
        length_max=limits.ACCOUNT_ID_LENGTH_MAX,
        pattern=limits.ACCOUNT_ID_PATTERN,
        required=True,
        rule="1..128 characters of [A-Za-z0-9._:@/+-] starting with a letter or digit",
    )


def check_credit_type(v: Violations, value: str) -> None:
    _check_text(
        v,
        "credit_type",
        value,
        length_max=limits.CREDIT_TYPE_LENGTH_MAX,
        pattern=limits.CREDIT_TYPE_PATTERN,
        required=True,
        rule="1..32 characters of [a-z0-9_] starting with a letter",
    )


def check_idempotency_key(v: Violations, value: str) -> None:
    _check_text(
        v,
        "idempotency_key",
        value,
        length_max=limits.IDEMPOTENCY_KEY_LENGTH_MAX,
        pattern=limits.VISIBLE_ASCII_PATTERN,
        required=True,
        rule="1..128 visible ASCII characters",
    )


def check_labels(v: Violations, action: str, request_id: str) -> None:
    _check_text(
        v,
        "action",
        action,
        length_max=limits.ACTION_LENGTH_MAX,
        pattern=limits.ACTION_PATTERN,
        required=False,
        rule="0..64 characters of [a-z0-9_.:/-]",
    )
    _check_text(
        v,
        "request_id",
        request_id,
        length_max=limits.REQUEST_ID_LENGTH_MAX,
        pattern=limits.VISIBLE_ASCII_PATTERN,
        required=False,
        rule="0..128 visible ASCII characters",
    )


def check_amount(v: Violations, amount: int, *, minimum: int, field: str = "amount") -> None:
    if not minimum <= amount <= limits.AMOUNT_MAX:
        v.add(field, f"is {amount}; must be between {minimum} and {limits.AMOUNT_MAX}")


def check_metadata(v: Violations, metadata: Mapping[str, str]) -> None:
    if len(metadata) > limits.METADATA_ENTRIES_MAX:
        v.add("metadata", f"has {len(metadata)} entries; at most {limits.METADATA_ENTRIES_MAX}")
        return
    for key, value in metadata.items():
        _check_text(
            v,
            "metadata",
            key,
            length_max=limits.METADATA_KEY_LENGTH_MAX,
            pattern=limits.METADATA_KEY_PATTERN,
            required=True,
            rule="keys of 1..64 characters of [a-z0-9_.-] starting with a letter",
        )
        if len(value) > limits.METADATA_VALUE_LENGTH_MAX:
            v.add(f"metadata[{key[:40]}]", f"value is {len(value)} characters; at most 256")
        elif any(unicodedata.category(ch) == "Cc" for ch in value):  # C0, DEL and C1 controls
            v.add(f"metadata[{key[:40]}]", "value contains control characters")


def check_reservation_id(v: Violations, value: str) -> None:
    _check_text(
        v,
        "reservation_id",
        value,
        length_max=limits.RESERVATION_ID_LENGTH_MAX,
        pattern=limits.VISIBLE_ASCII_PATTERN,
        required=True,
        rule="an id returned by Reserve",
    )


# google.protobuf.Timestamp's range, 0001-01-01 .. 9999-12-31, in microseconds.
TIME_US_MIN = -62_135_596_800 * limits.MICROSECONDS_PER_SECOND
TIME_US_MAX = 253_402_300_799 * limits.MICROSECONDS_PER_SECOND


def check_time(v: Violations, field: str, value_us: int | None) -> bool:
    if value_us is None or TIME_US_MIN <= value_us <= TIME_US_MAX:
        return True
    v.add(field, "is not a valid timestamp (0001-01-01..9999-12-31)")
    return False


def validate_add_credits(
    cmd: AddCreditsCommand, now_us: int, caller: Caller
) -> InvalidRequest | None:
    """Raises for problems of the request itself. Returns (does not raise) an InvalidRequest
    when the only problems are relative to now (effective_at, expires_at): a retry of a key
    whose first outcome is stored must get that outcome even after its expires_at has passed,
    so the caller raises this only once the key turns out to be new."""
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    if cmd.source is None:
        v.add(
            "source",
            "is required: purchase, subscription, promotion, signup, referral, "
            "refund, admin or transfer",
        )
    check_account_id(v, cmd.account_id)
    check_credit_type(v, cmd.credit_type)
    check_amount(v, cmd.amount, minimum=1)
    check_idempotency_key(v, cmd.idempotency_key)
    check_metadata(v, cmd.metadata)
    _check_text(
        v,
        "external_ref",
        cmd.external_ref,
        length_max=limits.EXTERNAL_REF_LENGTH_MAX,
        pattern=limits.VISIBLE_ASCII_PATTERN,
        required=False,
        rule="0..255 visible ASCII characters",
    )
    if cmd.priority is not None and not limits.PRIORITY_MIN <= cmd.priority <= limits.PRIORITY_MAX:
        v.add("priority", f"is {cmd.priority}; must be between 0 and {limits.PRIORITY_MAX}")
    if not check_time(v, "effective_at", cmd.effective_at_us) or not check_time(
        v, "expires_at", cmd.expires_at_us
    ):
        v.raise_if_any()
    static_problems = len(v.items)
    effective_at_us = now_us if cmd.effective_at_us is None else cmd.effective_at_us
    if not (
        now_us - limits.GRANT_EFFECTIVE_PAST_MAX_US
        <= effective_at_us
        <= now_us + limits.GRANT_EFFECTIVE_FUTURE_MAX_US
    ):
        v.add("effective_at", "must be at most 7 days in the past and 400 days in the future")
    if cmd.expires_at_us is not None:
        if cmd.expires_at_us <= max(now_us, effective_at_us):
            v.add("expires_at", "must be in the future and after effective_at")
        elif cmd.expires_at_us > now_us + limits.GRANT_EXPIRES_FUTURE_MAX_US:
            v.add("expires_at", "must be at most 10 years in the future")
    if static_problems:
        v.raise_if_any()  # every problem at once, the time-relative ones included
    return InvalidRequest(v.items) if v.items else None


def validate_reserve(cmd: ReserveCommand, ttl_seconds_max: int, caller: Caller) -> None:
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    check_account_id(v, cmd.account_id)
    check_credit_type(v, cmd.credit_type)
    check_amount(v, cmd.amount, minimum=1)
    check_idempotency_key(v, cmd.idempotency_key)
    check_metadata(v, cmd.metadata)
    if (
        cmd.ttl_seconds != 0
        and not limits.HOLD_TTL_SECONDS_MIN <= cmd.ttl_seconds <= ttl_seconds_max
    ):
        v.add(
            "ttl_seconds",
            f"is {cmd.ttl_seconds}; must be 0 (server default) or between "
            f"{limits.HOLD_TTL_SECONDS_MIN} and {ttl_seconds_max}",
        )
    v.raise_if_any()


def validate_commit(cmd: CommitCommand, caller: Caller) -> None:
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    check_account_id(v, cmd.account_id)
    check_reservation_id(v, cmd.reservation_id)
    if cmd.amount is not None:
        check_amount(v, cmd.amount, minimum=0)
    v.raise_if_any()


def validate_release(cmd: ReleaseCommand, caller: Caller) -> None:
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    check_account_id(v, cmd.account_id)
    check_reservation_id(v, cmd.reservation_id)
    v.raise_if_any()


def validate_check(account_id: str, credit_type: str, amount: int) -> None:
    v = Violations()
    check_account_id(v, account_id)
    check_credit_type(v, credit_type)
    check_amount(v, amount, minimum=0)
    v.raise_if_any()


def validate_history(query: HistoryQuery) -> None:
    v = Violations()
    check_account_id(v, query.account_id)
    if query.credit_type:
        check_credit_type(v, query.credit_type)
    if len(query.kinds) > limits.HISTORY_KINDS_MAX:
        v.add("kinds", f"lists {len(query.kinds)} kinds; at most {limits.HISTORY_KINDS_MAX}")
    times_ok = check_time(v, "start_time", query.start_us) & check_time(v, "end_time", query.end_us)
    if times_ok and query.start_us is not None and query.end_us is not None:
        if query.end_us <= query.start_us:
            v.add("end_time", "must be after start_time")
        elif query.end_us - query.start_us > limits.HISTORY_SPAN_MAX_US:
            v.add("end_time", "the time range spans more than 366 days; narrow it")
    if query.reservation_id:
        check_reservation_id(v, query.reservation_id)
    check_labels(v, query.action, "")
    if not 0 <= query.page_size <= limits.HISTORY_PAGE_SIZE_MAX:
        v.add(
            "page_size",
            f"is {query.page_size}; must be 0 (50) or 1..{limits.HISTORY_PAGE_SIZE_MAX}",
        )
    if len(query.page_token) > limits.PAGE_TOKEN_LENGTH_MAX:
        v.add("page_token", "is too long; pass the token History returned, unchanged")
    v.raise_if_any()


def validate_account_status(account_id: str, reason: str, caller: Caller) -> None:
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    check_account_id(v, account_id)
    if len(reason) > limits.ACCOUNT_STATUS_REASON_LENGTH_MAX:
        v.add(
            "reason",
            f"is {len(reason)} characters; at most {limits.ACCOUNT_STATUS_REASON_LENGTH_MAX}",
        )
    elif any(unicodedata.category(ch) == "Cc" for ch in reason):
        v.add("reason", "contains control characters")
    v.raise_if_any()


def validate_claw_back(cmd: ClawBackCommand, caller: Caller) -> None:
    v = Violations()
    check_labels(v, caller.action, caller.request_id)
    check_account_id(v, cmd.account_id)
    _check_text(
        v,
        "grant_id",
        cmd.grant_id,
        length_max=limits.GRANT_ID_LENGTH_MAX,
        pattern=limits.VISIBLE_ASCII_PATTERN,
        required=True,
        rule="an id returned by AddCredits",
    )
    check_amount(v, cmd.amount, minimum=1)
    check_idempotency_key(v, cmd.idempotency_key)
    v.raise_if_any()
