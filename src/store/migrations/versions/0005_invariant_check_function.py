"""credits_assert(ok, message): a statement that finds an invariant broken fails, and with it
its transaction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21

The Reserve batches write in one statement that commits on its own (store/reserve_batch.py):
there is no transaction left open for the server to roll back once it has read the statement's
counts, so the statement checks them itself, with this function. Postgres only: SQLite runs
no batches.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # VOLATILE (the default), so the planner never evaluates a call ahead of its arguments.
    op.execute(
        """
        CREATE FUNCTION credits_assert(ok boolean, message text) RETURNS boolean
        LANGUAGE plpgsql AS $$
        BEGIN
            IF ok IS NOT TRUE THEN
                RAISE EXCEPTION 'invariant broken: %', message USING ERRCODE = 'XX000';
            END IF;
            RETURN true;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION credits_assert(boolean, text)")
