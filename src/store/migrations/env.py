"""Alembic environment: runs on the connection store.migrate hands it (async engine, run_sync)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from store.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through `credits-server migrate` (store.migrate)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place; batch mode recreates tables when needed.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
