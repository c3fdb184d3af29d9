"""The development token: `make run` (SQLite) gets a caller with every scope and a token in a
file, so the README's grpcurl session works on a fresh clone without any setup.

Issued at start when asked (`--dev-token`), or on SQLite while no caller exists yet. Never
without asking on Postgres: a shared database gets its callers from an administrator
(`credits-server callers`). The file sits next to the SQLite database (`var/dev-token` beside
`var/credits.db`), or in `var/` of the working directory otherwise.
"""

from __future__ import annotations

import logging
import os
import pathlib

from store.callers import ALL_SCOPES, CallerStore
from store.database import normalise_url
from store.errors import StoreUnavailable

log = logging.getLogger("credits.server")

DEV_CALLER = "dev"
DEV_TOKEN_LABEL = "dev-token"
DEV_TOKEN_FILE_NAME = "dev-token"
_ACTOR = "credits-server --dev-token"


def dev_token_path(database_url: str) -> pathlib.Path:
    url = normalise_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return pathlib.Path(url.database).parent / DEV_TOKEN_FILE_NAME
    return pathlib.Path("var") / DEV_TOKEN_FILE_NAME


async def ensure_dev_token(store: CallerStore, database_url: str, forced: bool) -> None:
    """Issues the dev token when forced, or on SQLite while the caller table is empty."""
    if not forced:
        if normalise_url(database_url).get_backend_name() != "sqlite":
            return
        try:
            if await store.count() > 0:
                return
        except StoreUnavailable:
            log.warning(
                "cannot look for callers (is the database migrated? `credits-server migrate` "
                "or --migrate); no development token issued"
            )
            return
    path = dev_token_path(database_url)
    token = await issue_dev_token(store)
    _write_secret(path, token)
    # Asked for by name (or a fresh embedded database): showing it is the point.
    log.warning(
        "development token issued: caller 'dev' holds every scope; send "
        '-H "authorization: Bearer $(cat %s)"',
        path,
        extra={"fields": {"caller": DEV_CALLER, "token_file": str(path), "token": token}},
    )


async def issue_dev_token(store: CallerStore) -> str:
    """A fresh token for the `dev` caller (created with every scope if missing); the dev
    caller's earlier dev tokens are revoked, so restarts with --dev-token do not pile them up."""
    existing = await store.get(DEV_CALLER)
    if existing is None:
        await store.add(DEV_CALLER, ALL_SCOPES, (), _ACTOR)
    else:
        if existing.caller.scopes != ALL_SCOPES:
            await store.grant(DEV_CALLER, ALL_SCOPES, _ACTOR)
        if existing.caller.account_prefixes:
            await store.restrict(DEV_CALLER, (), _ACTOR)
        if not existing.caller.active:
            await store.set_active(DEV_CALLER, True, _ACTOR)
        for old in existing.tokens:
            if old.live and old.label == DEV_TOKEN_LABEL:
                await store.revoke_token(DEV_CALLER, old.token_id, _ACTOR)
    token, _ = await store.create_token(DEV_CALLER, DEV_TOKEN_LABEL, _ACTOR)
    return token


def _write_secret(path: pathlib.Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Owner-only from the first byte: the file is created 0600, never widened then narrowed.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
