"""Applies the Alembic migrations: `credits-migrate` / `credits-server migrate`, or on start-up
with --migrate. Several replicas may run it at once: on Postgres an advisory lock makes them take
turns, and the later ones find nothing left to do."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from store.database import create_engine


@dataclass(frozen=True)
class Migrations:
    """One Alembic history: where its scripts are, the Postgres advisory lock its runs take
    turns on, and its version table (the ledger's and the listener's share a database)."""

    script_location: str
    lock_id: int
    version_table: str = "alembic_version"

    def alembic_config(self, connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", self.script_location)
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    async def migrate(self, engine: AsyncEngine, revision: str = "head") -> None:
        def upgrade(connection: Connection) -> None:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": self.lock_id})
            command.upgrade(self.alembic_config(connection), revision)

        async with engine.begin() as conn:
            await conn.run_sync(upgrade)

    async def current_revision(self, engine: AsyncEngine) -> str | None:
        def read(connection: Connection) -> str | None:
            opts = {"version_table": self.version_table}
            return MigrationContext.configure(connection, opts=opts).get_current_revision()

        async with engine.connect() as conn:
            return await conn.run_sync(read)


# The ledger's history. The lock id is an arbitrary constant naming "credits schema migration"
# among Postgres advisory locks.
LEDGER = Migrations("store:migrations", lock_id=0x63726564_6D6967)
alembic_config = LEDGER.alembic_config
head_revision = LEDGER.head_revision
migrate = LEDGER.migrate
current_revision = LEDGER.current_revision


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
