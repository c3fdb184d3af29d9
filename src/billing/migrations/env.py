"""Alembic environment of the listener's tables: runs on the connection billing.migrate hands it.

Its own version table (billing_alembic_version) keeps this history apart from the ledger's, so
both can live in one database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from billing.migrate import VERSION_TABLE
from billing.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through `credits-listener migrate` (billing.migrate)")


def _only_billing_tables(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Sharing a database with the ledger: its tables are not ours to drop.
    return type_ != "table" or (name or "").startswith("billing_")


context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    include_object=_only_billing_tables,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
