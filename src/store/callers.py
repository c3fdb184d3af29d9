"""Callers of the service: their scopes, the account prefixes they may use, their tokens.

A caller is a name (also the journal's principal, and the identity a client certificate may
carry), a set of scopes, and optionally a list of account-id prefixes it is restricted to. It
proves who it is with a bearer token or, on a TLS listener with a client CA, a certificate.

A token is 32 random bytes, shown once when it is created. The database keeps only its SHA-256:
with 256 bits of entropy a plain hash cannot be reversed or guessed, so no salt or slow hash is
needed, and a lookup is an index probe on the digest: no secret is ever compared byte by byte,
so there is no timing difference to measure. Every change is recorded in caller_changes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from store import limits, schema
from store.clock import Clock, SystemClock
from store.ids import new_id
from store.tx import Transactor

# Tokens start with this, so secret scanners and people can tell what a leaked string is.
TOKEN_PREFIX = "crd_"


class Scope(enum.StrEnum):
    READ = "credits.read"
    SPEND = "credits.spend"
    GRANT = "credits.grant"
    ADMIN = "credits.admin"


ALL_SCOPES = frozenset(Scope)


class CallerStatus(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class CallerProblem(Exception):
    """An administration request that cannot be done; the message tells the operator why."""


@dataclass(frozen=True)
class CallerRecord:
    name: str
    scopes: frozenset[Scope]
    # Empty: every account.
    account_prefixes: tuple[str, ...] = ()
    active: bool = True

    def may_use_account(self, account_id: str) -> bool:
        return not self.account_prefixes or account_id.startswith(self.account_prefixes)


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    caller_name: str
    label: str
    created_at_us: int
    revoked_at_us: int | None = None

    @property
    def live(self) -> bool:
        return self.revoked_at_us is None


@dataclass(frozen=True)
class CallerListing:
    caller: CallerRecord
    created_at_us: int
    tokens: tuple[TokenRecord, ...]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(limits.TOKEN_RANDOM_BYTES)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(names: Iterable[str]) -> frozenset[Scope]:
    """Scope names, comma-separated or not; "all" is every scope."""
    scopes: set[Scope] = set()
    for part in (p.strip() for name in names for p in name.split(",")):
        if part == "all":
            scopes |= ALL_SCOPES
        elif part in Scope._value2member_map_:
            scopes.add(Scope(part))
        elif part:
            known = ", ".join(sorted(ALL_SCOPES))
            raise CallerProblem(f"unknown scope {part!r} (known: {known}, or all)")
    return frozenset(scopes)


def check_caller_name(name: str) -> str:
    if not 0 < len(name) <= limits.CALLER_NAME_LENGTH_MAX or not (
        limits.CALLER_NAME_PATTERN.fullmatch(name)
    ):
        raise CallerProblem(
            f"caller name {name[:200]!r} must be 1..{limits.CALLER_NAME_LENGTH_MAX} characters "
            "of [A-Za-z0-9._:@/+-], starting with a letter or digit"
        )
    return name


def check_account_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(sorted(set(prefixes)))
    if len(checked) > limits.CALLER_ACCOUNT_PREFIXES_MAX:
        raise CallerProblem(
            f"{len(checked)} account prefixes; at most {limits.CALLER_ACCOUNT_PREFIXES_MAX}"
        )
    for prefix in checked:
        # A prefix is the start of an account id, so it follows the account id rules.
        if not 0 < len(prefix) <= limits.ACCOUNT_ID_LENGTH_MAX or not (
            limits.ACCOUNT_ID_PATTERN.fullmatch(prefix)
        ):
            raise CallerProblem(
                f"account prefix {prefix[:200]!r} must be the start of an account id: "
                f"1..{limits.ACCOUNT_ID_LENGTH_MAX} characters of [A-Za-z0-9._:@/+-]"
            )
    return checked


def _check_label(label: str) -> str:
    if len(label) > limits.TOKEN_LABEL_LENGTH_MAX or not label.isprintable():
        raise CallerProblem(
            f"token label must be at most {limits.TOKEN_LABEL_LENGTH_MAX} printable characters"
        )
    return label


def _record(row: Any) -> CallerRecord:
    scopes = frozenset(Scope(s) for s in str(row.scopes).split() if s in Scope._value2member_map_)
    prefixes = tuple(str(p) for p in json.loads(row.account_prefixes_json))
    return CallerRecord(
        name=row.caller_name,
        scopes=scopes,
        account_prefixes=prefixes,
        active=row.status == CallerStatus.ACTIVE,
    )


def _token_record(row: Any) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        caller_name=row.caller_name,
        label=row.label,
        created_at_us=row.created_at_us,
        revoked_at_us=row.revoked_at_us,
    )


def _scopes_text(scopes: Iterable[Scope]) -> str:
    return " ".join(sorted(scopes))


_CALLER_COLUMNS = (
    schema.callers.c.caller_name,
    schema.callers.c.status,
    schema.callers.c.scopes,
    schema.callers.c.account_prefixes_json,
)


class CallerStore:
    """Reads (for authentication) and changes (for the `credits-server callers` CLI)."""

    def __init__(self, transactor: Transactor, clock: Clock | None = None) -> None:
        self.transactor = transactor
        self.clock: Clock = clock or SystemClock()

    # ---- lookups on the request path ----------------------------------------------------------

    async def find_by_token_digest(self, digest: str) -> CallerRecord | None:
        """The caller holding the live (unrevoked) token with this digest, or None."""

        async def work(conn: AsyncConnection) -> CallerRecord | None:
            row = (
                await conn.execute(
                    select(*_CALLER_COLUMNS)
                    .join(
                        schema.caller_tokens,
                        schema.caller_tokens.c.caller_name == schema.callers.c.caller_name,
                    )
                    .where(
                        schema.caller_tokens.c.token_sha256 == digest,
                        schema.caller_tokens.c.revoked_at_us.is_(None),
                    )
                )
            ).first()
            return None if row is None else _record(row)

        return await self.transactor.read(work)

    async def find_by_identities(self, names: Sequence[str]) -> CallerRecord | None:
        """The caller named by the first of `names` (a certificate's identities) that is one."""
        if not names:
            return None

        async def work(conn: AsyncConnection) -> CallerRecord | None:
            rows = (
                await conn.execute(
                    select(*_CALLER_COLUMNS).where(schema.callers.c.caller_name.in_(list(names)))
                )
            ).all()
            by_name = {row.caller_name: _record(row) for row in rows}
            return next((by_name[n] for n in names if n in by_name), None)

        return await self.transactor.read(work)

    async def count(self) -> int:
        async def work(conn: AsyncConnection) -> int:
            return int(
                (await conn.execute(select(func.count()).select_from(schema.callers))).scalar_one()
            )

        return await self.transactor.read(work)

    async def get(self, name: str) -> CallerListing | None:
        listings = await self._listings(name)
        return listings[0] if listings else None

    async def list_all(self) -> list[CallerListing]:
        return await self._listings(None)

    async def _listings(self, name: str | None) -> list[CallerListing]:
        async def work(conn: AsyncConnection) -> list[CallerListing]:
            callers = select(*_CALLER_COLUMNS, schema.callers.c.created_at_us).order_by(
                schema.callers.c.caller_name
            )
            tokens = select(schema.caller_tokens).order_by(
                schema.caller_tokens.c.created_at_us, schema.caller_tokens.c.token_id
            )
            if name is not None:
                callers = callers.where(schema.callers.c.caller_name == name)
                tokens = tokens.where(schema.caller_tokens.c.caller_name == name)
            by_caller: dict[str, list[TokenRecord]] = {}
            for row in (await conn.execute(tokens)).all():
                by_caller.setdefault(row.caller_name, []).append(_token_record(row))
            return [
                CallerListing(
                    _record(row), row.created_at_us, tuple(by_caller.get(row.caller_name, ()))
                )
                for row in (await conn.execute(callers)).all()
            ]

        return await self.transactor.read(work)

    # ---- administration -----------------------------------------------------------------------

    async def add(
        self,
        name: str,
        scopes: frozenset[Scope],
        account_prefixes: Iterable[str],
        actor: str,
    ) -> CallerRecord:
        check_caller_name(name)
        prefixes = check_account_prefixes(account_prefixes)

        async def work(conn: AsyncConnection) -> CallerRecord:
            if await _locked_caller(conn, name) is not None:
                raise CallerProblem(f"caller {name!r} already exists (see `callers list`)")
            now_us = self.clock.now_us()
            await conn.execute(
                insert(schema.callers).values(
                    caller_name=name,
                    status=CallerStatus.ACTIVE.value,
                    scopes=_scopes_text(scopes),
                    account_prefixes_json=json.dumps(list(prefixes)),
                    created_at_us=now_us,
                    updated_at_us=now_us,
                )
            )
            detail = {"scopes": sorted(scopes), "account_prefixes": list(prefixes)}
            await _log(conn, name, "added", detail, actor, now_us)
            return CallerRecord(name, scopes, prefixes)

        return await self.transactor.write(work)

    async def grant(self, name: str, scopes: frozenset[Scope], actor: str) -> CallerRecord:
        return await self._change_scopes(name, scopes, actor, granting=True)

    async def revoke(self, name: str, scopes: frozenset[Scope], actor: str) -> CallerRecord:
        return await self._change_scopes(name, scopes, actor, granting=False)

    async def _change_scopes(
        self, name: str, scopes: frozenset[Scope], actor: str, *, granting: bool
    ) -> CallerRecord:
        async def work(conn: AsyncConnection) -> CallerRecord:
            caller = await _existing_caller(conn, name)
            changed = caller.scopes | scopes if granting else caller.scopes - scopes
            now_us = self.clock.now_us()
            await _update_caller(conn, name, now_us, scopes=_scopes_text(changed))
            change = "scopes_granted" if granting else "scopes_revoked"
            await _log(conn, name, change, {"scopes": sorted(scopes)}, actor, now_us)
            return CallerRecord(name, changed, caller.account_prefixes, caller.active)

        return await self.transactor.write(work)

    async def restrict(
        self, name: str, account_prefixes: Iterable[str], actor: str
    ) -> CallerRecord:
        """Replaces the caller's account prefixes; an empty list allows every account."""
        prefixes = check_account_prefixes(account_prefixes)

        async def work(conn: AsyncConnection) -> CallerRecord:
            caller = await _existing_caller(conn, name)
            now_us = self.clock.now_us()
            await _update_caller(
                conn, name, now_us, account_prefixes_json=json.dumps(list(prefixes))
            )
            detail = {"account_prefixes": list(prefixes)}
            await _log(conn, name, "restricted", detail, actor, now_us)
            return CallerRecord(name, caller.scopes, prefixes, caller.active)

        return await self.transactor.write(work)

    async def set_active(self, name: str, active: bool, actor: str) -> CallerRecord:
        """A disabled caller keeps its tokens and scopes but none of its credentials work."""
        status = CallerStatus.ACTIVE if active else CallerStatus.DISABLED

        async def work(conn: AsyncConnection) -> CallerRecord:
            caller = await _existing_caller(conn, name)
            now_us = self.clock.now_us()
            await _update_caller(conn, name, now_us, status=status.value)
            change = "enabled" if active else "disabled"
            await _log(conn, name, change, {}, actor, now_us)
            return CallerRecord(name, caller.scopes, caller.account_prefixes, active)

        return await self.transactor.write(work)

    async def create_token(self, name: str, label: str, actor: str) -> tuple[str, TokenRecord]:
        """A new token for the caller: returns it (the only time it is seen) and its record."""
        token = new_token()
        return token, await self.add_token(name, token, label, actor)

    async def add_token(self, name: str, token: str, label: str, actor: str) -> TokenRecord:
        """Stores the digest of a token made elsewhere (tests, a secret manager)."""
        assert len(token) >= 32, "a token needs at least 32 characters of entropy"
        _check_label(label)

        async def work(conn: AsyncConnection) -> TokenRecord:
            await _existing_caller(conn, name)
            live = (
                await conn.execute(
                    select(func.count())
                    .select_from(schema.caller_tokens)
                    .where(
                        schema.caller_tokens.c.caller_name == name,
                        schema.caller_tokens.c.revoked_at_us.is_(None),
                    )
                )
            ).scalar_one()
            if live >= limits.CALLER_TOKENS_LIVE_MAX:
                raise CallerProblem(
                    f"caller {name!r} already has {live} live tokens "
                    f"(at most {limits.CALLER_TOKENS_LIVE_MAX}); revoke one first"
                )
            record = TokenRecord(new_id("tok"), name, label, self.clock.now_us())
            await conn.execute(
                insert(schema.caller_tokens).values(
                    token_sha256=token_digest(token),
                    token_id=record.token_id,
                    caller_name=name,
                    label=label,
                    created_at_us=record.created_at_us,
                    revoked_at_us=None,
                )
            )
            detail = {"token_id": record.token_id, "label": label}
            await _log(conn, name, "token_created", detail, actor, record.created_at_us)
            return record

        return await self.transactor.write(work)

    async def revoke_token(self, name: str, token_id: str, actor: str) -> TokenRecord:
        async def work(conn: AsyncConnection) -> TokenRecord:
            await _existing_caller(conn, name)
            row = (
                await conn.execute(
                    select(schema.caller_tokens)
                    .where(
                        schema.caller_tokens.c.token_id == token_id,
                        schema.caller_tokens.c.caller_name == name,
                    )
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise CallerProblem(f"caller {name!r} has no token {token_id!r}")
            token = _token_record(row)
            if not token.live:
                return token  # revoking twice changes nothing
            now_us = self.clock.now_us()
            await conn.execute(
                update(schema.caller_tokens)
                .where(schema.caller_tokens.c.token_id == token_id)
                .values(revoked_at_us=now_us)
            )
            await _log(conn, name, "token_revoked", {"token_id": token_id}, actor, now_us)
            return TokenRecord(token_id, name, token.label, token.created_at_us, now_us)

        return await self.transactor.write(work)


async def _locked_caller(conn: AsyncConnection, name: str) -> CallerRecord | None:
    # FOR UPDATE (Postgres): two administrators changing one caller take turns.
    row = (
        await conn.execute(
            select(*_CALLER_COLUMNS).where(schema.callers.c.caller_name == name).with_for_update()
        )
    ).first()
    return None if row is None else _record(row)


async def _existing_caller(conn: AsyncConnection, name: str) -> CallerRecord:
    caller = await _locked_caller(conn, name)
    if caller is None:
        raise CallerProblem(f"no caller {name!r} (see `callers list`, or `callers add`)")
    return caller


async def _update_caller(conn: AsyncConnection, name: str, now_us: int, **values: str) -> None:
    await conn.execute(
        update(schema.callers)
        .where(schema.callers.c.caller_name == name)
        .values(updated_at_us=now_us, **values)
    )


async def _log(
    conn: AsyncConnection,
    name: str,
    change: str,
    detail: Mapping[str, object],
    actor: str,
    now_us: int,
) -> None:
    await conn.execute(
        insert(schema.caller_changes).values(
            change_id=new_id("chg"),
            caller_name=name,
            change=change,
            detail_json=json.dumps(detail, sort_keys=True),
            actor=actor[: limits.CALLER_NAME_LENGTH_MAX],
            created_at_us=now_us,
        )
    )
