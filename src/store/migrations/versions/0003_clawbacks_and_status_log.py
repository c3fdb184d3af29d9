"""grants.clawed_back (ClawBack) and account_status_changes (who locked an account, and why).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

A grant's parts now sum with clawed_back: remaining + held + consumed + expired + clawed_back =
amount. The status log is append-only, like the journal.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PARTS_NONNEGATIVE = (
    "remaining >= 0 AND held >= 0 AND consumed >= 0 AND expired >= 0 AND clawed_back >= 0"
)
_PARTS_SUM = "remaining + held + consumed + expired + clawed_back = amount"


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch_op:
        batch_op.add_column(
            sa.Column("clawed_back", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.drop_constraint(op.f("ck_grants_parts_nonnegative"), type_="check")
        batch_op.drop_constraint(op.f("ck_grants_parts_sum_to_amount"), type_="check")
        batch_op.create_check_constraint("parts_nonnegative", _PARTS_NONNEGATIVE)
        batch_op.create_check_constraint("parts_sum_to_amount", _PARTS_SUM)
    op.create_table(
        "account_status_changes",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("status_version", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "account_id", "status_version", name=op.f("pk_account_status_changes")
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER account_status_changes_append_only BEFORE UPDATE OR DELETE "
            "ON account_status_changes FOR EACH ROW EXECUTE FUNCTION journal_refuse_change()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER account_status_changes_no_{verb.lower()} BEFORE {verb} "
                "ON account_status_changes BEGIN "
                f"SELECT RAISE(ABORT, 'account_status_changes is append-only: {verb} refused'); END"
            )


def downgrade() -> None:
    op.drop_table("account_status_changes")
    with op.batch_alter_table("grants") as batch_op:
        batch_op.drop_constraint(op.f("ck_grants_parts_nonnegative"), type_="check")
        batch_op.drop_constraint(op.f("ck_grants_parts_sum_to_amount"), type_="check")
        batch_op.create_check_constraint(
            "parts_nonnegative",
            "remaining >= 0 AND held >= 0 AND consumed >= 0 AND expired >= 0",
        )
        batch_op.create_check_constraint(
            "parts_sum_to_amount", "remaining + held + consumed + expired = amount"
        )
        batch_op.drop_column("clawed_back")
