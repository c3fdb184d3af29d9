"""The build's promises: generated stubs match the proto, migrations match the schema."""

from __future__ import annotations

import asyncio
import filecmp
import importlib.util
import pathlib
import subprocess
import sys
import tomllib

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import _create_database, _drop_database, run_sync
from sqlalchemy import text
from sqlalchemy.engine import Connection

from store.database import create_engine
from store.migrate import current_revision, head_revision, migrate
from store.schema import metadata

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_not_stale(tmp_path: pathlib.Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc generated nothing"
    for relative in fresh:
        committed = ROOT / "src" / relative
        assert committed.exists(), f"{relative} is not committed: run `make proto`"
        assert filecmp.cmp(tmp_path / relative, committed, shallow=False), (
            f"src/{relative} is stale: run `make proto`"
        )


def _schema_drift(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def _migrated_matches_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate(engine)
        await migrate(engine)  # a second run finds nothing to do
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            drift = await conn.run_sync(_schema_drift)
        assert drift == [], f"migrations and store/schema.py differ: {drift}"
    finally:
        await engine.dispose()


def test_migrations_build_exactly_the_declared_schema_on_sqlite(tmp_path: pathlib.Path) -> None:
    asyncio.run(_migrated_matches_schema(f"sqlite:///{tmp_path / 'm.db'}"))


def test_migrations_build_exactly_the_declared_schema_on_postgres(postgres_url: str) -> None:
    asyncio.run(_migrated_matches_schema(postgres_url))


_GRANT_AT_0005 = (
    "INSERT INTO grants (account_id, grant_id, credit_type, amount, remaining, held, consumed,"
    " expired, source, priority, effective_at_us, expires_at_us, external_ref, metadata_json,"
    " idempotency_key, created_at_us) VALUES (:account, :grant, 'default', 10, :remaining,"
    " :held, :consumed, 0, 'purchase', 100, 0, :expires, '', '{}', :grant, 0)"
)


async def _migration_0006_settles_spent_expiring_grants(url: str) -> None:
    engine = create_engine(url)
    # (remaining, held, expires_at_us) -> settled after the migration
    grants = {
        "spent": (0, 0, 5, True),
        "held": (0, 4, 5, False),
        "left": (3, 0, 5, False),
        "never-expires": (0, 0, None, False),
    }
    try:
        await migrate(engine, "0005")
        async with engine.begin() as conn:
            for grant_id, (remaining, held, expires, _) in grants.items():
                await conn.execute(
                    text(_GRANT_AT_0005),
                    {"account": "a", "grant": grant_id, "remaining": remaining, "held": held,
                     "consumed": 10 - remaining - held, "expires": expires},
                )  # fmt: skip
        await migrate(engine)
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT grant_id, expiry_settled FROM grants"))
            settled = {grant_id: bool(value) for grant_id, value in rows}
        assert settled == {grant_id: g[3] for grant_id, g in grants.items()}
    finally:
        await engine.dispose()


def test_migration_0006_settles_the_expiring_grants_already_spent_out_on_sqlite(
    tmp_path: pathlib.Path,
) -> None:
    asyncio.run(_migration_0006_settles_spent_expiring_grants(f"sqlite:///{tmp_path / 'm.db'}"))


def test_migration_0006_settles_the_expiring_grants_already_spent_out_on_postgres(
    postgres_admin_url: str | None, postgres_url: str
) -> None:
    assert postgres_admin_url is not None  # postgres_url failed or skipped otherwise
    url = run_sync(_create_database(postgres_admin_url))
    try:
        asyncio.run(_migration_0006_settles_spent_expiring_grants(url))
    finally:
        run_sync(_drop_database(postgres_admin_url, url))


def test_server_module_runs_under_this_interpreter() -> None:
    assert sys.version_info >= (3, 11)


def test_every_command_prints_its_help() -> None:
    """`--help` renders every flag's help text (argparse formats it with %, so a stray percent
    sign in one help string breaks the whole page)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = [[name, "--help"] for name in scripts] + [
        ["credits-server", "callers", "--help"],
        ["credits-server", "callers", "add", "--help"],
    ]
    bin_dir = pathlib.Path(sys.executable).parent
    for command in commands:
        argv = [str(bin_dir / command[0]), *command[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stderr}"
        assert "usage:" in done.stdout, done.stdout
