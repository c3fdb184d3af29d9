"""callers, caller_tokens (SHA-256 of bearer tokens) and caller_changes (append-only log).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21

Who may call the service, with which scopes, on which account prefixes, and the tokens they
prove it with. Tokens are stored only as their SHA-256. Every change to a caller or a token is
recorded in caller_changes, which, like the journal, refuses UPDATE and DELETE.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callers",
        sa.Column("caller_name", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.String(length=256), nullable=False),
        sa.Column("account_prefixes_json", sa.Text(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'disabled')", name=op.f("ck_callers_status")),
        sa.PrimaryKeyConstraint("caller_name", name=op.f("pk_callers")),
    )
    op.create_table(
        "caller_tokens",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("caller_name", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_caller_tokens")),
        sa.UniqueConstraint("token_id", name=op.f("uq_caller_tokens_token_id")),
    )
    op.create_index("ix_caller_tokens_caller", "caller_tokens", ["caller_name"])
    op.create_table(
        "caller_changes",
        sa.Column("change_id", sa.String(length=64), nullable=False),
        sa.Column("caller_name", sa.String(length=128), nullable=False),
        sa.Column("change", sa.String(length=32), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("change_id", name=op.f("pk_caller_changes")),
    )
    op.create_index("ix_caller_changes_caller", "caller_changes", ["caller_name", "created_at_us"])
    if op.get_bind().dialect.name == "postgresql":
        # journal_refuse_change() is 0001's: it raises whatever the operation.
        op.execute(
            "CREATE TRIGGER caller_changes_append_only BEFORE UPDATE OR DELETE "
            "ON caller_changes FOR EACH ROW EXECUTE FUNCTION journal_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER caller_changes_no_truncate BEFORE TRUNCATE "
            "ON caller_changes FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER caller_changes_no_{verb.lower()} BEFORE {verb} "
                "ON caller_changes BEGIN "
                f"SELECT RAISE(ABORT, 'caller_changes is append-only: {verb} refused'); END"
            )


def downgrade() -> None:
    op.drop_index("ix_caller_changes_caller", table_name="caller_changes")
    op.drop_table("caller_changes")
    op.drop_index("ix_caller_tokens_caller", table_name="caller_tokens")
    op.drop_table("caller_tokens")
    op.drop_table("callers")
