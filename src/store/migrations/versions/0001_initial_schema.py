"""initial schema: accounts, wallets, grants, reservations, journal, idempotency keys.

The journal is made append-only in the database itself: triggers refuse UPDATE, DELETE (and
TRUNCATE on Postgres), so not even a bug or a hand-typed statement can rewrite history.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 06:43:42.014002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'locked')", name=op.f("ck_accounts_status")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "grants",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("consumed", sa.BigInteger(), nullable=False),
        sa.Column("expired", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("effective_at_us", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_us", sa.BigInteger(), nullable=True),
        sa.Column("external_ref", sa.String(length=255), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_grants_amount_positive")),
        sa.CheckConstraint(
            "remaining + held + consumed + expired = amount",
            name=op.f("ck_grants_parts_sum_to_amount"),
        ),
        sa.CheckConstraint(
            "remaining >= 0 AND held >= 0 AND consumed >= 0 AND expired >= 0",
            name=op.f("ck_grants_parts_nonnegative"),
        ),
        sa.PrimaryKeyConstraint("account_id", "grant_id", name=op.f("pk_grants")),
    )
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.create_index(
            "ix_grants_expiring",
            ["expires_at_us"],
            unique=False,
            postgresql_where=sa.text("remaining > 0 AND expires_at_us IS NOT NULL"),
            sqlite_where=sa.text("remaining > 0 AND expires_at_us IS NOT NULL"),
        )
        batch_op.create_index("ix_grants_wallet", ["account_id", "credit_type"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("request_json", sa.Text(), nullable=False),
        sa.Column("outcome_json", sa.Text(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "idempotency_key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index("ix_idempotency_keys_created", ["created_at_us"], unique=False)

    op.create_table(
        "journal",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("available_after", sa.BigInteger(), nullable=False),
        sa.Column("reserved_after", sa.BigInteger(), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("reservation_id", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("grant_effects_json", sa.Text(), nullable=False),
        sa.CheckConstraint(
            "available_after >= 0 AND reserved_after >= 0",
            name=op.f("ck_journal_after_nonnegative"),
        ),
        sa.CheckConstraint("sequence > 0", name=op.f("ck_journal_sequence_positive")),
        sa.PrimaryKeyConstraint("account_id", "credit_type", "sequence", name=op.f("pk_journal")),
    )
    with op.batch_alter_table("journal", schema=None) as batch_op:
        batch_op.create_index(
            "ix_journal_account_time", ["account_id", "created_at_us"], unique=False
        )

    op.create_table(
        "reservation_slices",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("reservation_id", sa.String(length=64), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_reservation_slices_amount_positive")),
        sa.PrimaryKeyConstraint(
            "account_id", "reservation_id", "grant_id", name=op.f("pk_reservation_slices")
        ),
    )
    op.create_table(
        "reservations",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("reservation_id", sa.String(length=64), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_us", sa.BigInteger(), nullable=False),
        sa.Column("resolved_at_us", sa.BigInteger(), nullable=True),
        sa.Column("amount_committed", sa.BigInteger(), nullable=False),
        sa.Column("amount_released", sa.BigInteger(), nullable=False),
        sa.Column("amount_expired", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("reserve_sequence", sa.BigInteger(), nullable=False),
        sa.Column("resolution_sequence", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(status = 'pending' AND resolved_at_us IS NULL AND resolution_sequence IS NULL AND amount_committed + amount_released + amount_expired = 0) OR (status <> 'pending' AND resolved_at_us IS NOT NULL AND resolution_sequence IS NOT NULL AND amount_committed + amount_released + amount_expired = amount)",
            name=op.f("ck_reservations_resolved_once_in_full"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'committed', 'released', 'expired')",
            name=op.f("ck_reservations_status"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_reservations_amount_positive")),
        sa.CheckConstraint(
            "amount_committed >= 0 AND amount_released >= 0 AND amount_expired >= 0",
            name=op.f("ck_reservations_parts_nonnegative"),
        ),
        sa.PrimaryKeyConstraint("account_id", "reservation_id", name=op.f("pk_reservations")),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_reservations_pending_expiry",
            ["expires_at_us"],
            unique=False,
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )

    op.create_table(
        "wallets",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("last_sequence >= 0", name=op.f("ck_wallets_sequence_nonnegative")),
        sa.CheckConstraint("reserved >= 0", name=op.f("ck_wallets_reserved_nonnegative")),
        sa.PrimaryKeyConstraint("account_id", "credit_type", name=op.f("pk_wallets")),
    )

    _install_journal_guard()


_PG_GUARD = [
    """
    CREATE FUNCTION journal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'journal is append-only: % refused', TG_OP;
    END
    $$
    """,
    """
    CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change()
    """,
    """
    CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change()
    """,
]
_SQLITE_GUARD = [
    """
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
    BEGIN SELECT RAISE(ABORT, 'journal is append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
    BEGIN SELECT RAISE(ABORT, 'journal is append-only: DELETE refused'); END
    """,
]


def _install_journal_guard() -> None:
    statements = _PG_GUARD if op.get_bind().dialect.name == "postgresql" else _SQLITE_GUARD
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS journal_no_truncate ON journal")
        op.execute("DROP TRIGGER IF EXISTS journal_append_only ON journal")
        op.execute("DROP FUNCTION IF EXISTS journal_refuse_change()")
    op.drop_table("wallets")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_reservations_pending_expiry",
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )

    op.drop_table("reservations")
    op.drop_table("reservation_slices")
    with op.batch_alter_table("journal", schema=None) as batch_op:
        batch_op.drop_index("ix_journal_account_time")

    op.drop_table("journal")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_created")

    op.drop_table("idempotency_keys")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_index("ix_grants_wallet")
        batch_op.drop_index(
            "ix_grants_expiring",
            postgresql_where=sa.text("remaining > 0 AND expires_at_us IS NOT NULL"),
            sqlite_where=sa.text("remaining > 0 AND expires_at_us IS NOT NULL"),
        )

    op.drop_table("grants")
    op.drop_table("accounts")
