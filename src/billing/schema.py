"""The listener's tables, all prefixed `billing_` so they can share a database with the ledger.

Times are integer microseconds since the Unix epoch (`*_at_us`), except Stripe's own timestamps,
kept in the seconds Stripe sends (`*_s`). Money is never stored here: only credit amounts.
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
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

STRIPE_ID = String(255)
ACCOUNT_ID = String(128)
CREDIT_TYPE = String(32)
KEY = String(128)

EVENT_STATUSES = ("pending", "done", "ignored", "parked")

# The durable inbox: one row per verified Stripe event, written before the webhook answers 2xx.
# The primary key on event_id is what makes a redelivered event a no-op.
events = Table(
    "billing_events",
    metadata,
    Column("event_id", STRIPE_ID, primary_key=True),
    Column("event_type", String(128), nullable=False),
    Column("livemode", Boolean, nullable=False),
    # Stripe's `created` of the event.
    Column("stripe_created_s", BigInteger, nullable=False),
    # The body exactly as received and verified.
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    # A pending event is due from this instant; a claimed one is leased until it.
    Column("next_attempt_at_us", BigInteger, nullable=False),
    Column("received_at_us", BigInteger, nullable=False),
    Column("processed_at_us", BigInteger, nullable=True),
    Column("last_error", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    CheckConstraint("status IN ('pending', 'done', 'ignored', 'parked')", name="status"),
    CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
    Index(None, "status", "next_attempt_at_us"),
)

# Every grant the listener made, under the idempotency key it used: a second line of defence
# against granting twice (the ledger keeps keys for days, this table for as long as it lives),
# and the way from a refunded or disputed payment back to its grants and account.
grants = Table(
    "billing_grants",
    metadata,
    Column("idempotency_key", KEY, primary_key=True),
    Column("account_id", ACCOUNT_ID, nullable=False),
    Column("credit_type", CREDIT_TYPE, nullable=False),
    Column("grant_id", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    # The Checkout Session (cs_...) or invoice (in_...) the grant pays for.
    Column("stripe_ref", STRIPE_ID, nullable=False),
    Column("payment_intent", STRIPE_ID, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    CheckConstraint("kind IN ('purchase', 'allocation', 'upgrade')", name="kind"),
    CheckConstraint("amount > 0", name="amount_positive"),
    Index(None, "payment_intent"),
)

# One row per ClawBack made for a refund. target_credits is how much of the grant the refunds
# seen so far claim in total; the next refund of the same charge claws back only the rest.
clawbacks = Table(
    "billing_clawbacks",
    metadata,
    Column("idempotency_key", KEY, primary_key=True),
    Column("grant_key", KEY, nullable=False),
    Column("charge_id", STRIPE_ID, nullable=False),
    # Stripe's charge.amount_refunded (minor currency units) the clawback answers.
    Column("amount_refunded", BigInteger, nullable=False),
    Column("target_credits", BigInteger, nullable=False),
    Column("amount_requested", BigInteger, nullable=False),
    Column("amount_clawed_back", BigInteger, nullable=False),
    # What could not be taken back because it was already spent, held or expired.
    Column("shortfall", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    CheckConstraint(
        "amount_clawed_back >= 0 AND shortfall >= 0 "
        "AND amount_clawed_back + shortfall = amount_requested",
        name="parts_sum_to_requested",
    ),
    Index(None, "grant_key"),
)

# Subscriptions the listener has heard of: whose they are, and whether they ended.
subscriptions = Table(
    "billing_subscriptions",
    metadata,
    Column("subscription_id", STRIPE_ID, primary_key=True),
    Column("account_id", ACCOUNT_ID, nullable=True),
    # Set by customer.subscription.deleted: periods starting at or after it get nothing.
    Column("ended_at_s", BigInteger, nullable=True),
    Column("updated_at_us", BigInteger, nullable=False),
)

# The allocation level (credits per period) of each subscription period and credit type, so an
# upgrade grants only the difference and a downgrade within the period grants nothing.
periods = Table(
    "billing_periods",
    metadata,
    Column("subscription_id", STRIPE_ID, primary_key=True),
    Column("period_end_s", BigInteger, primary_key=True),
    Column("credit_type", CREDIT_TYPE, primary_key=True),
    Column("period_start_s", BigInteger, nullable=False),
    Column("level_credits", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("period_end_s > period_start_s", name="period_positive"),
)

# Disputes seen, so that deliveries out of order (closed before created) and several disputes
# on one account resolve to the right lock state.
disputes = Table(
    "billing_disputes",
    metadata,
    Column("dispute_id", STRIPE_ID, primary_key=True),
    Column("account_id", ACCOUNT_ID, nullable=False),
    Column("payment_intent", STRIPE_ID, nullable=False),
    Column("status", String(32), nullable=False),
    Column("closed", Boolean, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Index(None, "account_id"),
)
