"""Every limit of the Stripe listener, in one place (STYLE.md: put a limit on everything)."""

from __future__ import annotations

import re
from typing import Final

MICROSECONDS_PER_SECOND: Final = 1_000_000
SECONDS_PER_DAY: Final = 86_400

# ---- webhook ---------------------------------------------------------------------------------
# Stripe's event payloads are a few KiB; an invoice with its first page of lines stays far below
# this. Anything bigger is not a Stripe event and is refused before it is read in full.
WEBHOOK_BODY_BYTES_MAX: Final = 256 * 1024
# Stripe's own default: a signed timestamp older than this is a replay, not a delivery.
SIGNATURE_TOLERANCE_SECONDS: Final = 300
# Rotation needs two secrets at once (old and new); more than a few is a mistake.
SIGNING_SECRETS_MAX: Final = 4
EVENT_ID_LENGTH_MAX: Final = 255
EVENT_TYPE_LENGTH_MAX: Final = 128
# Error and outcome texts kept with an event, so one huge message cannot bloat the inbox.
EVENT_ERROR_LENGTH_MAX: Final = 2000
EVENT_OUTCOME_LENGTH_MAX: Final = 1000

# ---- worker ----------------------------------------------------------------------------------
ATTEMPTS_MAX_DEFAULT: Final = 20
ATTEMPTS_MAX_CEILING: Final = 100
BACKOFF_INITIAL_SECONDS_DEFAULT: Final = 2.0
# 2 s doubling, capped at 1 h: 20 attempts ride out roughly 9 hours of credits-server outage
# before an event is parked (and a parked event is one `credits-listener replay` away).
BACKOFF_MAX_SECONDS_DEFAULT: Final = 3600.0
BACKOFF_SECONDS_CEILING: Final = 86_400.0
BACKOFF_SECONDS_FLOOR: Final = 0.01
POLL_INTERVAL_SECONDS_DEFAULT: Final = 1.0
POLL_INTERVAL_SECONDS_MIN: Final = 0.01
POLL_INTERVAL_SECONDS_MAX: Final = 60.0
# One event's processing (a Stripe API page or two, a few RPCs) must end well within this...
EVENT_PROCESSING_TIMEOUT_SECONDS: Final = 60.0
# ...and a claimed event stays invisible to other claimers this long, so a worker that died
# mid-event leaves it to be picked up again instead of stuck forever.
CLAIM_LEASE_SECONDS: Final = 120.0
# Claims lost to another claimer in a row before the worker waits for its next poll.
CLAIM_TRIES_MAX: Final = 10
# Processed events are kept (for deduplication and inspection) at least this long: Stripe
# retries a delivery for up to 3 days, so anything shorter could let a late retry in twice.
RETENTION_DAYS_DEFAULT: Final = 30
RETENTION_DAYS_MIN: Final = 7
RETENTION_DAYS_MAX: Final = 3650
PRUNE_INTERVAL_SECONDS: Final = 3600.0
PRUNE_BATCH_MAX: Final = 1000
# `credits-listener parked` prints at most this many events.
PARKED_LIST_MAX: Final = 500

# ---- credits service (the contract's numbers, protos/credits/v1/credits.proto) ---------------
CREDITS_RPC_TIMEOUT_SECONDS: Final = 5.0
# gRPC backs off reconnecting to a dead server up to 120 s by default; a restarted credits
# server should see the backlog drain within a second, and probing a dead port is cheap.
GRPC_RECONNECT_BACKOFF_MAX_MS: Final = 1000
AMOUNT_MAX: Final = 1_000_000_000_000
ACCOUNT_ID_LENGTH_MAX: Final = 128
ACCOUNT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*")
CREDIT_TYPE_LENGTH_MAX: Final = 32
CREDIT_TYPE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*")
CREDIT_TYPE_DEFAULT: Final = "default"
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 128
EXTERNAL_REF_LENGTH_MAX: Final = 255
METADATA_VALUE_LENGTH_MAX: Final = 256
ACCOUNT_STATUS_REASON_LENGTH_MAX: Final = 256

# ---- Stripe API ------------------------------------------------------------------------------
STRIPE_API_TIMEOUT_SECONDS: Final = 10.0
STRIPE_NETWORK_RETRIES: Final = 2
STRIPE_ID_LENGTH_MAX: Final = 255
LINE_ITEMS_PAGE_SIZE: Final = 100
LINE_ITEMS_MAX: Final = 1000

# ---- configuration ---------------------------------------------------------------------------
PRICES_MAX: Final = 500
# Units of one pack in one Checkout Session.
PACK_QUANTITY_MAX: Final = 1000
# So that credits_per_unit x PACK_QUANTITY_MAX stays within one grant's AMOUNT_MAX.
CREDITS_PER_UNIT_MAX: Final = AMOUNT_MAX // PACK_QUANTITY_MAX
# Seats of one plan on one invoice line.
PLAN_QUANTITY_MAX: Final = 10_000
CREDITS_PER_PERIOD_MAX: Final = AMOUNT_MAX // PLAN_QUANTITY_MAX
EXPIRY_GRACE_SECONDS_MAX: Final = 90 * SECONDS_PER_DAY
URL_LENGTH_MAX: Final = 2048
PURCHASE_BODY_BYTES_MAX: Final = 4096
