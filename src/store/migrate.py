"""Applies the Alembic migrations: `credits-migrate` / `credits-server migrate`, or on start-up
with --migrate. Several replicas may run it at once: on Postgres an advisory lock makes them take
turns, and the later ones find nothing left to do."""

from __future__ import annotations

import argparse
import asyncio
import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from store.database import create_engine

# Arbitrary constant naming "credits schema migration" among Postgres advisory locks.
_MIGRATION_LOCK_ID = 0x63726564_6D6967


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "store:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    def upgrade(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        command.upgrade(alembic_config(connection), revision)

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Apply the credits database migrations.")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("CREDITS_DATABASE_URL", "sqlite:///var/credits.db"),
        help="database URL (env CREDITS_DATABASE_URL; default sqlite:///var/credits.db)",
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        engine = create_engine(args.database_url)
        try:
            await migrate(engine)
            print(f"database at revision {await current_revision(engine)}")
        finally:
            await engine.dispose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
