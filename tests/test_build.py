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
