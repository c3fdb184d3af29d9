"""Wallet and grant updates stay heap-only (HOT) on Postgres.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22

Every Reserve, Commit and Release updates a wallet row and its grants' rows. Postgres keeps
such an update heap-only (the new row version on the same page, no new index entries) only if
the page has room and no index covers a changed column; `ix_grants_expiring` named `remaining`
in its predicate, so no grant update was heap-only, and each wrote a new entry into every index
of grants. With 1,000,000 wallets, most of those index pages were not in memory
(docs/performance.md, eighth session).

- `grants.expiry_settled`: the grant sweeper sets it once nothing of an expiring grant is left
  to expire, and `ix_grants_expiring` now selects on it instead of on `remaining`. Grants
  already spent out (remaining and held both 0) are settled here.
- fillfactor 80 on wallets and grants: pages written from now on keep a fifth free for updated
  row versions. Pages already full get room as Postgres rewrites them; `VACUUM FULL wallets,
  grants` (it locks both tables while it runs) gives every page room at once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_WHERE_BEFORE = "remaining > 0 AND expires_at_us IS NOT NULL"
_WHERE_POSTGRES = "expires_at_us IS NOT NULL AND NOT expiry_settled"
_WHERE_SQLITE = "expires_at_us IS NOT NULL AND expiry_settled = 0"
_FILLFACTOR_PERCENT = 80


def _create_expiring_index(where_postgres: str, where_sqlite: str) -> None:
    op.create_index(
        "ix_grants_expiring",
        "grants",
        ["expires_at_us"],
        postgresql_where=sa.text(where_postgres),
        sqlite_where=sa.text(where_sqlite),
    )


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch_op:
        batch_op.add_column(
            sa.Column(
                "expiry_settled", sa.Boolean(), nullable=False, server_default=sa.text("false")
            )
        )
    op.execute(
        "UPDATE grants SET expiry_settled = true"
        " WHERE expires_at_us IS NOT NULL AND remaining = 0 AND held = 0"
    )
    op.drop_index("ix_grants_expiring", table_name="grants")
    _create_expiring_index(_WHERE_POSTGRES, _WHERE_SQLITE)
    if op.get_bind().dialect.name == "postgresql":
        for table in ("wallets", "grants"):
            op.execute(f"ALTER TABLE {table} SET (fillfactor = {_FILLFACTOR_PERCENT})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("wallets", "grants"):
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    op.drop_index("ix_grants_expiring", table_name="grants")
    _create_expiring_index(_WHERE_BEFORE, _WHERE_BEFORE)
    with op.batch_alter_table("grants") as batch_op:
        batch_op.drop_column("expiry_settled")
