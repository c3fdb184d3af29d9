"""The tables. Every table's key starts with account_id, so the schema can be distributed by
account (Citus) and no hot-path transaction ever spans two accounts.

Times are integer microseconds since the Unix epoch (UTC): exact, and the same on SQLite and
Postgres. Amounts are BIGINT whole credits. CHECK constraints restate the invariants of
DESIGN.md, so even a bug in this code cannot store a negative balance or lose a credit.

Reserve, Commit and Release update a wallet row and its grants' rows on every call. On Postgres
those updates stay heap-only (HOT: the new row version on the same page, no new index entries,
no index pages to read or write) as long as the page has room and no index of the table covers
a column they change, as a key, an expression or a partial index's predicate. So both tables
leave room on every page (HOT_FILLFACTOR_PERCENT), and no index of theirs names `reserved`,
`last_sequence`, `remaining`, `held`, `consumed` or `expired`
(tests/test_plans.py::test_hot_path_updates_stay_heap_only checks both).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ACCOUNT_ID = String(128)
CREDIT_TYPE = String(32)
ID = String(64)
# Share of each wallets and grants page filled by inserts; the rest takes updated row versions.
HOT_FILLFACTOR_PERCENT = 80

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("status", String(16), nullable=False),
    # Incremented on every status change: the version of the status copies in the cache.
    Column("status_version", BigInteger, nullable=False, server_default="0"),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("status IN ('active', 'locked')", name="status"),
)

# One row per (account, credit type). Writers of a wallet lock this row first (FOR UPDATE), so
# this row is the serialisation point of everything that changes the wallet's grants.
wallets = Table(
    "wallets",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("credit_type", CREDIT_TYPE, primary_key=True),
    # Sequence of the wallet's last journal entry; also the version of its cached balance.
    Column("last_sequence", BigInteger, nullable=False),
    # Sum of `held` over the wallet's grants.
    Column("reserved", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    CheckConstraint("reserved >= 0", name="reserved_nonnegative"),
    CheckConstraint("last_sequence >= 0", name="sequence_nonnegative"),
    postgresql_with={"fillfactor": HOT_FILLFACTOR_PERCENT},
)

# ix_grants_expiring's predicate, as each dialect renders `not_(grants.c.expiry_settled)`: a
# partial index serves a query only when the query's WHERE clause repeats its predicate.
GRANTS_EXPIRING_WHERE_POSTGRES = "expires_at_us IS NOT NULL AND NOT expiry_settled"
GRANTS_EXPIRING_WHERE_SQLITE = "expires_at_us IS NOT NULL AND expiry_settled = 0"

grants = Table(
    "grants",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("grant_id", ID, primary_key=True),
    Column("credit_type", CREDIT_TYPE, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("consumed", BigInteger, nullable=False),
    Column("expired", BigInteger, nullable=False),
    Column("clawed_back", BigInteger, nullable=False, server_default="0"),
    Column("source", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("effective_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=True),
    Column("external_ref", String(255), nullable=False),
    Column("metadata_json", Text, nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    # True once nothing of an expiring grant is left to expire: past expires_at, remaining and
    # held both 0 (no call can give it credits again). Set by the grant sweeper only, never by
    # the hot path, so that the sweeper's index need not name `remaining` (module docstring).
    # Stays false for grants that never expire.
    Column("expiry_settled", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint(
        "remaining >= 0 AND held >= 0 AND consumed >= 0 AND expired >= 0 AND clawed_back >= 0",
        name="parts_nonnegative",
    ),
    CheckConstraint(
        "remaining + held + consumed + expired + clawed_back = amount", name="parts_sum_to_amount"
    ),
    Index("ix_grants_wallet", "account_id", "credit_type"),
    # The grant sweeper's scan: expiring grants it has not settled, by expiry. (The grants with
    # credits left among them are those it has to expire.)
    Index(
        "ix_grants_expiring",
        "expires_at_us",
        postgresql_where=text(GRANTS_EXPIRING_WHERE_POSTGRES),
        sqlite_where=text(GRANTS_EXPIRING_WHERE_SQLITE),
    ),
    postgresql_with={"fillfactor": HOT_FILLFACTOR_PERCENT},
)

reservations = Table(
    "reservations",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("reservation_id", ID, primary_key=True),
    Column("credit_type", CREDIT_TYPE, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=False),
    Column("resolved_at_us", BigInteger, nullable=True),
    Column("amount_committed", BigInteger, nullable=False),
    Column("amount_released", BigInteger, nullable=False),
    Column("amount_expired", BigInteger, nullable=False),
    Column("action", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("metadata_json", Text, nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("reserve_sequence", BigInteger, nullable=False),
    # The journal entry that resolved it, so a repeated Commit/Release returns the same answer.
    Column("resolution_sequence", BigInteger, nullable=True),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("status IN ('pending', 'committed', 'released', 'expired')", name="status"),
    CheckConstraint(
        "amount_committed >= 0 AND amount_released >= 0 AND amount_expired >= 0",
        name="parts_nonnegative",
    ),
    CheckConstraint(
        "(status = 'pending' AND resolved_at_us IS NULL AND resolution_sequence IS NULL"
        " AND amount_committed + amount_released + amount_expired = 0)"
        " OR (status <> 'pending' AND resolved_at_us IS NOT NULL"
        " AND resolution_sequence IS NOT NULL"
        " AND amount_committed + amount_released + amount_expired = amount)",
        name="resolved_once_in_full",
    ),
    # The hold sweeper's scan.
    Index(
        "ix_reservations_pending_expiry",
        "expires_at_us",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
)

reservation_slices = Table(
    "reservation_slices",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("reservation_id", ID, primary_key=True),
    Column("grant_id", ID, primary_key=True),
    Column("amount", BigInteger, nullable=False),
    CheckConstraint("amount > 0", name="amount_positive"),
)

# Append-only: the migration installs triggers that refuse UPDATE and DELETE.
journal = Table(
    "journal",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("credit_type", CREDIT_TYPE, primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("available_after", BigInteger, nullable=False),
    Column("reserved_after", BigInteger, nullable=False),
    Column("grant_id", String(64), nullable=False),
    Column("reservation_id", String(64), nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    # [[grant_id, remaining_delta, held_delta, consumed_delta, expired_delta], ...]
    Column("grant_effects_json", Text, nullable=False),
    CheckConstraint("sequence > 0", name="sequence_positive"),
    CheckConstraint("available_after >= 0 AND reserved_after >= 0", name="after_nonnegative"),
    # History: an account's entries newest first.
    Index("ix_journal_account_time", "account_id", "created_at_us"),
)

# The first completed outcome of each idempotency key (DESIGN.md invariant 4).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    Column("idempotency_key", String(128), primary_key=True),
    Column("operation", String(32), nullable=False),
    # The request's fields as canonical JSON, to name the field that differs on reuse.
    Column("request_json", Text, nullable=False),
    # The stored outcome: {"result": ...} or {"failure": ...}.
    Column("outcome_json", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Index("ix_idempotency_keys_created", "created_at_us"),
)

# Append-only record of account status changes: who locked or unlocked an account, and why.
account_status_changes = Table(
    "account_status_changes",
    metadata,
    Column("account_id", ACCOUNT_ID, primary_key=True),
    # The account's status_version this change produced.
    Column("status_version", BigInteger, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("reason", String(256), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
)

# Who may call the service (docs/auth.md). A caller's name is the journal's principal. Small
# reference tables, not keyed by account: with Citus they are reference tables, copied to every
# node, and the hot path only ever reads them (through an in-process cache).
CALLER_NAME = String(128)

callers = Table(
    "callers",
    metadata,
    Column("caller_name", CALLER_NAME, primary_key=True),
    Column("status", String(16), nullable=False),
    # The granted scopes, sorted and space-separated ("credits.read credits.spend").
    Column("scopes", String(256), nullable=False),
    # JSON list of account-id prefixes the caller may use; [] means every account.
    Column("account_prefixes_json", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("status IN ('active', 'disabled')", name="status"),
)

# Bearer tokens, stored as the SHA-256 of the token: the table never holds a usable secret.
caller_tokens = Table(
    "caller_tokens",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    # Public handle for listing and revoking; reveals nothing about the token.
    Column("token_id", String(64), nullable=False, unique=True),
    Column("caller_name", CALLER_NAME, nullable=False),
    Column("label", String(64), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("revoked_at_us", BigInteger, nullable=True),
    Index("ix_caller_tokens_caller", "caller_name"),
)

# Append-only record of every change to callers and tokens: who did what, when. Never a secret.
caller_changes = Table(
    "caller_changes",
    metadata,
    Column("change_id", ID, primary_key=True),
    Column("caller_name", CALLER_NAME, nullable=False),
    Column("change", String(32), nullable=False),
    # JSON object of what changed (scopes, prefixes, token id and label).
    Column("detail_json", Text, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Index("ix_caller_changes_caller", "caller_name", "created_at_us"),
)
