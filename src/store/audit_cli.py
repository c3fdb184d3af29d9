"""`credits-audit`: replays the journal, prints every mismatch, exits 1 if there is any."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from store.audit import audit
from store.database import create_engine


async def run(database_url: str, account_prefix: str = "") -> int:
    engine = create_engine(database_url)
    try:
        report = await audit(engine, account_prefix)
    finally:
        await engine.dispose()
    for mismatch in report.mismatches:
        print(f"MISMATCH {mismatch}")
    print(
        f"audited {report.wallets} wallets, {report.grants} grants, {report.entries} journal "
        f"entries, {report.reservations} reservations: "
        + ("clean" if report.clean else f"{len(report.mismatches)} mismatches")
    )
    return 0 if report.clean else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Replay the credits journal and compare.")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("CREDITS_DATABASE_URL", "sqlite:///var/credits.db"),
        help="database URL (env CREDITS_DATABASE_URL; default sqlite:///var/credits.db)",
    )
    parser.add_argument("--account-prefix", default="", help="only accounts starting with this")
    args = parser.parse_args(argv)
    sys.exit(asyncio.run(run(args.database_url, args.account_prefix)))


if __name__ == "__main__":
    main()
