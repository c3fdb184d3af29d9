"""Applies the listener's Alembic migrations (`credits-listener migrate`, or `serve --migrate`).

On Postgres an advisory lock makes listeners starting together take turns. The listener's
history has its own version table and lock (see store.migrate.Migrations), so it shares a
database with the ledger's.
"""

from __future__ import annotations

from store.migrate import Migrations

VERSION_TABLE = "billing_alembic_version"
# Arbitrary constant naming "billing schema migration" among Postgres advisory locks; distinct
# from the ledger's, so the two may migrate one database at the same time.
LISTENER = Migrations("billing:migrations", lock_id=0x62696C6C_6D6967, version_table=VERSION_TABLE)
alembic_config = LISTENER.alembic_config
head_revision = LISTENER.head_revision
migrate = LISTENER.migrate
current_revision = LISTENER.current_revision
