"""`credits-server callers ...`: who may call the service, with which scopes, on which accounts,
and their bearer tokens (docs/auth.md).

Changes go straight to the database (CREDITS_DATABASE_URL or --database-url); running servers
see them within their credential cache TTL (5 s by default). `token-create` prints the token on
stdout and nothing else, so `TOKEN=$(credits-server callers token-create billing)` captures it;
it is shown this once and stored only as its SHA-256.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from server.config import DEFAULT_DATABASE_URL
from store import limits
from store.callers import (
    ALL_SCOPES,
    CallerListing,
    CallerProblem,
    CallerRecord,
    CallerStore,
    parse_scopes,
)
from store.database import create_engine
from store.errors import StoreUnavailable
from store.tx import Transactor

_SCOPES_HELP = f"scope: {', '.join(sorted(ALL_SCOPES))}, or all (repeat, or comma-separate)"
_PREFIX_HELP = "account-id prefix the caller is restricted to, e.g. user: (repeat for several)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credits-server callers",
        description="Manage the callers of the credits service and their tokens (docs/auth.md).",
    )
    # On every subcommand, so they may follow it: `callers list --database-url ...`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=os.environ.get("CREDITS_DATABASE_URL", DEFAULT_DATABASE_URL),
        help=f"database to manage (CREDITS_DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    common.add_argument(
        "--actor",
        default="",
        help="who is making the change, for caller_changes (default: the OS user)",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="command")

    add = commands.add_parser("add", parents=[common], help="register a caller")
    add.add_argument("name", help="caller name: the journal's principal, or a certificate's SAN/CN")
    add.add_argument("--scope", action="append", default=[], help=_SCOPES_HELP)
    add.add_argument("--account-prefix", action="append", default=[], help=_PREFIX_HELP)

    for name, verb in (("grant", "give"), ("revoke", "take away")):
        change = commands.add_parser(name, parents=[common], help=f"{verb} scopes")
        change.add_argument("name")
        change.add_argument("--scope", action="append", required=True, help=_SCOPES_HELP)

    restrict = commands.add_parser(
        "restrict", parents=[common], help="replace the caller's account prefixes"
    )
    restrict.add_argument("name")
    group = restrict.add_mutually_exclusive_group(required=True)
    group.add_argument("--account-prefix", action="append", default=[], help=_PREFIX_HELP)
    group.add_argument(
        "--all-accounts", action="store_true", help="lift the restriction: every account"
    )

    for name, verb in (("disable", "refuse every credential of"), ("enable", "re-enable")):
        toggle = commands.add_parser(name, parents=[common], help=f"{verb} a caller")
        toggle.add_argument("name")

    create = commands.add_parser(
        "token-create",
        parents=[common],
        help="issue a token (printed once on stdout, stored as its SHA-256)",
    )
    create.add_argument("name")
    create.add_argument(
        "--label",
        default="",
        help=f"what the token is for, e.g. 'prod 2026-11' (at most "
        f"{limits.TOKEN_LABEL_LENGTH_MAX} characters)",
    )

    revoke_token = commands.add_parser(
        "token-revoke", parents=[common], help="revoke a token by its id"
    )
    revoke_token.add_argument("name")
    revoke_token.add_argument("token_id", help="tok_... as `callers list` shows it")

    listing = commands.add_parser(
        "list", parents=[common], help="callers, scopes, prefixes and token ids"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per caller")
    return p


def _actor(args: argparse.Namespace) -> str:
    if args.actor:
        return str(args.actor)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _time(us: int | None) -> str:
    if us is None:
        return "-"
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(caller: CallerRecord) -> str:
    scopes = ",".join(sorted(caller.scopes)) or "(no scopes)"
    prefixes = ",".join(caller.account_prefixes) or "(all accounts)"
    status = "" if caller.active else "  DISABLED"
    return f"{caller.name}  scopes={scopes}  accounts={prefixes}{status}"


def _listing_json(listing: CallerListing) -> str:
    caller = listing.caller
    return json.dumps(
        {
            "name": caller.name,
            "active": caller.active,
            "scopes": sorted(caller.scopes),
            "account_prefixes": list(caller.account_prefixes),
            "created_at": _time(listing.created_at_us),
            "tokens": [
                {
                    "token_id": t.token_id,
                    "label": t.label,
                    "created_at": _time(t.created_at_us),
                    "revoked_at": None if t.live else _time(t.revoked_at_us),
                }
                for t in listing.tokens
            ],
        }
    )


def _print_listing(listing: CallerListing) -> None:
    print(_describe(listing.caller))
    for token in listing.tokens:
        state = "live" if token.live else f"revoked {_time(token.revoked_at_us)}"
        label = f"  {token.label!r}" if token.label else ""
        print(f"  {token.token_id}  created {_time(token.created_at_us)}  {state}{label}")


async def run(args: argparse.Namespace) -> int:
    engine = create_engine(args.database_url)
    store = CallerStore(Transactor(engine))
    actor = _actor(args)
    try:
        command = args.command
        if command == "add":
            caller = await store.add(
                args.name, parse_scopes(args.scope), args.account_prefix, actor
            )
            print(f"added {_describe(caller)}", file=sys.stderr)
        elif command in ("grant", "revoke"):
            change = store.grant if command == "grant" else store.revoke
            caller = await change(args.name, parse_scopes(args.scope), actor)
            print(_describe(caller), file=sys.stderr)
        elif command == "restrict":
            prefixes = () if args.all_accounts else args.account_prefix
            print(_describe(await store.restrict(args.name, prefixes, actor)), file=sys.stderr)
        elif command in ("disable", "enable"):
            caller = await store.set_active(args.name, command == "enable", actor)
            print(_describe(caller), file=sys.stderr)
        elif command == "token-create":
            token, record = await store.create_token(args.name, args.label, actor)
            print(token)
            print(
                f"token {record.token_id} for caller {args.name!r}: shown once; send it as "
                "'authorization: Bearer <token>'",
                file=sys.stderr,
            )
        elif command == "token-revoke":
            record = await store.revoke_token(args.name, args.token_id, actor)
            print(
                f"token {record.token_id} of {args.name!r} revoked at "
                f"{_time(record.revoked_at_us)}; servers refuse it within their cache TTL",
                file=sys.stderr,
            )
        else:
            assert command == "list", command
            for listing in await store.list_all():
                if args.json:
                    print(_listing_json(listing))
                else:
                    _print_listing(listing)
        return 0
    except CallerProblem as problem:
        print(f"credits-server callers {args.command}: {problem}", file=sys.stderr)
        return 1
    except StoreUnavailable as error:
        print(
            f"credits-server callers {args.command}: the database is unavailable or not "
            f"migrated ({error.__cause__ or error}); run `credits-server migrate` first",
            file=sys.stderr,
        )
        return 2
    finally:
        await engine.dispose()


def main(argv: Sequence[str]) -> int:
    return asyncio.run(run(parser().parse_args(list(argv))))
