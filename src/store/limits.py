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

# Error statuses travel in trailers, which gRPC clients cap at 8 KiB (16 KiB hard): the message
# and the field violations are cut to fit well inside, whatever the request held. Non-ASCII
# text grows up to 3x in the percent-encoded message and 4/3 in the base64 details.
STATUS_MESSAGE_BYTES_MAX: Final = 512
STATUS_VIOLATIONS_MAX: Final = 20
STATUS_VIOLATIONS_BYTES_MAX: Final = 3 * 1024
STATUS_FIELD_BYTES_MAX: Final = 64
STATUS_DESCRIPTION_BYTES_MAX: Final = 256

# Rows one sweeper pass touches, so a backlog never makes one giant transaction.
SWEEP_BATCH_MAX: Final = 500
# Pending reservations the metrics count at most per refresh (src/store/backlog.py): a count is
# a scan, and past this many the gauge saturates instead of the scan growing with the backlog.
BACKLOG_PENDING_SCAN_MAX: Final = 100_000

# Group commit on Postgres (store/batching.py: Reserve, Commit, Release): at most this many calls
# share one transaction; one batch of a kind runs at a time, and another starts beside it only
# once it has run this long (stuck behind a wallet lock, say), up to this many at once (the rest
# of the pool stays for other calls); a batch gives up after this long (its calls then go one by
# one).
BATCH_MAX: Final = 128
BATCH_STALL_SECONDS: Final = 0.02
BATCHES_IN_FLIGHT_MAX: Final = 4
BATCH_TIMEOUT_SECONDS: Final = 5.0
# A saturated server (its event loop's thread on the CPU at least this share of the time,
# store/loop_load.py, measured over windows this long), right after a batch of at least this
# many calls, lets the next batch wait up to this long for calls to fill it before it starts:
# per call, a bigger batch costs less CPU, and every call waits in gRPC's core anyway. A server
# below the share never waits, nor one whose batches are small (2 to 4 calls at half of peak).
# The share is not 1 at saturation: the loop's thread also waits for gRPC's poller thread to
# hand it calls, and read 0.76 to 0.91 at Reserve's peak on one machine, 0.77 to 0.80 on another
# (docs/performance.md, lever 14); the batch size tells peak from half of it.
BATCH_FILL_CPU_SHARE_MIN: Final = 0.70
BATCH_FILL_WAIT_MS_DEFAULT: Final = 5
BATCH_FILL_WAIT_MS_MAX: Final = 50
BATCH_FILL_AFTER_CALLS: Final = 12
LOOP_LOAD_WINDOW_SECONDS: Final = 0.01
# The batchers' own connections (store/batch_pool.py), beside the engine's pool: each batch in
# flight holds one. Transactions: a Commit or Release batch, or a Reserve batch on its locking
# path. Generic plans: a Reserve batch's read and write (it holds no other meanwhile).
BATCH_CONNECTIONS_MAX: Final = 2 * BATCHES_IN_FLIGHT_MAX
BATCH_GENERIC_CONNECTIONS_MAX: Final = BATCHES_IN_FLIGHT_MAX
# Wallets whose state, as the batches last wrote it, this process keeps, to decide the next
# Reserve batch on them without reading them (store/wallet_copies.py, --wallet-copies): about
# 0.5 KB each.
WALLET_COPIES_DEFAULT: Final = 20_000
WALLET_COPIES_MAX: Final = 1_000_000

# Rate limits (src/server/ratelimit.py, docs/rate-limits.md). A rate of 0 turns a limit off.
# Calls per second one caller may make across every RPC, and how many it may make at once.
RATE_CALLER_PER_SECOND_DEFAULT: Final = 2_000.0
RATE_CALLER_BURST_DEFAULT: Final = 4_000
# Reserve calls per second on one account, from all callers together.
RATE_ACCOUNT_RESERVES_PER_SECOND_DEFAULT: Final = 200.0
RATE_ACCOUNT_RESERVES_BURST_DEFAULT: Final = 400
# Credits per second reserved on one account; off unless configured.
RATE_ACCOUNT_CREDITS_PER_SECOND_DEFAULT: Final = 0.0
RATE_ACCOUNT_CREDITS_BURST_DEFAULT: Final = 0
# No configured rate or burst may exceed these (the largest reservation is AMOUNT_MAX).
RATE_PER_SECOND_MAX: Final = float(AMOUNT_MAX)
RATE_BURST_MAX: Final = AMOUNT_MAX
# Buckets one process keeps when it limits on its own (no Redis, or Redis failing). Evicting
# the least recently used bucket forgets its debt, so the bound is far above the callers and
# accounts active within one burst's refill time.
RATE_LOCAL_BUCKETS_MAX: Final = 100_000
# Concurrent rate checks share one pipelined Redis round trip, at most this many per trip.
RATE_CHECKS_PER_ROUND_TRIP_MAX: Final = 256
# A caller name longer than this is keyed by its digest, so keys stay short whatever it is.
RATE_CALLER_NAME_LENGTH_MAX: Final = 128

# Callers and their credentials (src/store/callers.py, src/server/auth.py, docs/auth.md).
# A caller's name is also the journal's principal (journal.principal is 128 characters) and may
# be a certificate identity (a DNS name, a spiffe:// URI, an e-mail address).
CALLER_NAME_LENGTH_MAX: Final = 128
CALLER_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*")
CALLER_ACCOUNT_PREFIXES_MAX: Final = 32
# Live (unrevoked) tokens per caller: enough for rotation with overlap, few enough to review.
CALLER_TOKENS_LIVE_MAX: Final = 8
TOKEN_LABEL_LENGTH_MAX: Final = 64
# 32 random bytes: 256 bits, so one SHA-256 (no salt, no stretching) is a safe way to store it.
TOKEN_RANDOM_BYTES: Final = 32
# An authorization header longer than this is refused before any lookup.
BEARER_TOKEN_LENGTH_MAX: Final = 256
# How long a credential lookup is reused in process: a revoked token or a changed scope takes
# effect within this time. The configured value may be 0 (no reuse) up to the maximum.
AUTH_CACHE_TTL_SECONDS_DEFAULT: Final = 5.0
AUTH_CACHE_TTL_SECONDS_MAX: Final = 300.0
# Lookups (token digests, certificate identities; unknown ones included) one process remembers.
AUTH_CACHE_ENTRIES_MAX: Final = 10_000
# A token accepted from memory in this last share of its entry's life is looked up again behind
# the call (server/auth.py): a credential in use never expires under its callers.
AUTH_REFRESH_AHEAD_SHARE: Final = 0.25
# Identities (SANs and the subject CN) read from one client certificate.
CERTIFICATE_IDENTITIES_MAX: Final = 16
