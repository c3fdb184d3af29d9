"""Every limit of the service, in one place. The proto comments quote these numbers."""

from __future__ import annotations

import re
from typing import Final

MICROSECONDS_PER_SECOND: Final = 1_000_000
MICROSECONDS_PER_DAY: Final = 86_400 * MICROSECONDS_PER_SECOND

ACCOUNT_ID_LENGTH_MAX: Final = 128
ACCOUNT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*")
CREDIT_TYPE_LENGTH_MAX: Final = 32
CREDIT_TYPE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*")
CREDIT_TYPE_DEFAULT: Final = "default"
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 128
VISIBLE_ASCII_PATTERN: Final = re.compile(r"[\x21-\x7e]*")
RESERVATION_ID_LENGTH_MAX: Final = 64
ACTION_LENGTH_MAX: Final = 64
ACTION_PATTERN: Final = re.compile(r"[a-z0-9_.:/-]*")
REQUEST_ID_LENGTH_MAX: Final = 128
ACCOUNT_STATUS_REASON_LENGTH_MAX: Final = 256
# Grant ids and reservation ids are ours; anything longer is not one.
GRANT_ID_LENGTH_MAX: Final = 64
EXTERNAL_REF_LENGTH_MAX: Final = 255

METADATA_ENTRIES_MAX: Final = 16
METADATA_KEY_LENGTH_MAX: Final = 64
METADATA_KEY_PATTERN: Final = re.compile(r"[a-z][a-z0-9_.-]*")
METADATA_VALUE_LENGTH_MAX: Final = 256

# One grant or one reservation: 10^12 credits. A wallet: 10^15, far below int64 (9.2 * 10^18),
# so no sum of grants, holds or journal amounts can overflow.
AMOUNT_MAX: Final = 1_000_000_000_000
WALLET_BALANCE_MAX: Final = 1_000_000_000_000_000

PRIORITY_MIN: Final = 0
PRIORITY_MAX: Final = 1000
PRIORITY_DEFAULT: Final = 100

GRANT_EFFECTIVE_PAST_MAX_US: Final = 7 * MICROSECONDS_PER_DAY
GRANT_EFFECTIVE_FUTURE_MAX_US: Final = 400 * MICROSECONDS_PER_DAY
GRANT_EXPIRES_FUTURE_MAX_US: Final = 3653 * MICROSECONDS_PER_DAY

HOLD_TTL_SECONDS_MIN: Final = 1
HOLD_TTL_SECONDS_DEFAULT: Final = 300
HOLD_TTL_SECONDS_MAX_DEFAULT: Final = 3600
# The configured maximum may not exceed this.
HOLD_TTL_SECONDS_CEILING: Final = 86_400

HISTORY_PAGE_SIZE_DEFAULT: Final = 50
HISTORY_PAGE_SIZE_MAX: Final = 500
HISTORY_SPAN_MAX_US: Final = 366 * MICROSECONDS_PER_DAY
HISTORY_KINDS_MAX: Final = 16
PAGE_TOKEN_LENGTH_MAX: Final = 512

# Idempotency records are kept at least this long (DESIGN.md: at least 24 h).
IDEMPOTENCY_RETENTION_SECONDS_MIN: Final = 86_400
IDEMPOTENCY_RETENTION_SECONDS_DEFAULT: Final = 7 * 86_400

REQUEST_BYTES_MAX: Final = 64 * 1024

# Rows one sweeper pass touches, so a backlog never makes one giant transaction.
SWEEP_BATCH_MAX: Final = 500
