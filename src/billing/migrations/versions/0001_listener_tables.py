"""listener tables: inbox, grants, clawbacks, subscriptions, periods, disputes.

Every table is prefixed `billing_`, and the history is kept in billing_alembic_version, so the
listener may share a database with the ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
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
        "billing_clawbacks",
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("grant_key", sa.String(length=128), nullable=False),
        sa.Column("charge_id", sa.String(length=255), nullable=False),
        sa.Column("amount_refunded", sa.BigInteger(), nullable=False),
        sa.Column("target_credits", sa.BigInteger(), nullable=False),
        sa.Column("amount_requested", sa.BigInteger(), nullable=False),
        sa.Column("amount_clawed_back", sa.BigInteger(), nullable=False),
        sa.Column("shortfall", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "amount_clawed_back >= 0 AND shortfall >= 0 AND amount_clawed_back + shortfall = amount_requested",
            name=op.f("ck_billing_clawbacks_parts_sum_to_requested"),
        ),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_billing_clawbacks")),
    )
    op.create_index(
        op.f("ix_billing_clawbacks_grant_key"), "billing_clawbacks", ["grant_key"], unique=False
    )

    op.create_table(
        "billing_disputes",
        sa.Column("dispute_id", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("payment_intent", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("dispute_id", name=op.f("pk_billing_disputes")),
    )
    op.create_index(
        op.f("ix_billing_disputes_account_id"), "billing_disputes", ["account_id"], unique=False
    )

    op.create_table(
        "billing_events",
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("event_type", sa.String(length=128), nullable=False),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("stripe_created_s", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at_us", sa.BigInteger(), nullable=False),
        sa.Column("received_at_us", sa.BigInteger(), nullable=False),
        sa.Column("processed_at_us", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'ignored', 'parked')",
            name=op.f("ck_billing_events_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_billing_events_attempts_nonnegative")),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_billing_events")),
    )
    op.create_index(
        op.f("ix_billing_events_status_next_attempt_at_us"),
        "billing_events",
        ["status", "next_attempt_at_us"],
        unique=False,
    )

    op.create_table(
        "billing_grants",
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("grant_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("stripe_ref", sa.String(length=255), nullable=False),
        sa.Column("payment_intent", sa.String(length=255), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "kind IN ('purchase', 'allocation', 'upgrade')", name=op.f("ck_billing_grants_kind")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_billing_grants_amount_positive")),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_billing_grants")),
    )
    op.create_index(
        op.f("ix_billing_grants_payment_intent"), "billing_grants", ["payment_intent"], unique=False
    )

    op.create_table(
        "billing_periods",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("period_end_s", sa.BigInteger(), nullable=False),
        sa.Column("credit_type", sa.String(length=32), nullable=False),
        sa.Column("period_start_s", sa.BigInteger(), nullable=False),
        sa.Column("level_credits", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "period_end_s > period_start_s", name=op.f("ck_billing_periods_period_positive")
        ),
        sa.PrimaryKeyConstraint(
            "subscription_id", "period_end_s", "credit_type", name=op.f("pk_billing_periods")
        ),
    )
    op.create_table(
        "billing_subscriptions",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=True),
        sa.Column("ended_at_s", sa.BigInteger(), nullable=True),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_billing_subscriptions")),
    )


def downgrade() -> None:
    op.drop_table("billing_subscriptions")
    op.drop_table("billing_periods")
    op.drop_index(op.f("ix_billing_grants_payment_intent"), table_name="billing_grants")

    op.drop_table("billing_grants")
    op.drop_index(op.f("ix_billing_events_status_next_attempt_at_us"), table_name="billing_events")

    op.drop_table("billing_events")
    op.drop_index(op.f("ix_billing_disputes_account_id"), table_name="billing_disputes")

    op.drop_table("billing_disputes")
    op.drop_index(op.f("ix_billing_clawbacks_grant_key"), table_name="billing_clawbacks")

    op.drop_table("billing_clawbacks")
