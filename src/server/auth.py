"""Who is calling, and may they make this call (docs/auth.md).

A call names its caller with an `authorization: Bearer <token>` header or, on a mutual-TLS
listener, with its verified client certificate (the first of its SANs, then its subject CN, that
is a registered caller's name). A token, when sent, decides: the certificate then only proves
the connection comes from a trusted workload. The caller must then hold the scope of the RPC and,
when restricted to account prefixes, name an account that starts with one of them.

Lookups are cached in process for `cache_ttl_seconds` (5 s by default), unknown credentials
included, so the hot path costs a SHA-256 and a dict probe (a dict probe alone once the exact
header was accepted: authorize_in_memory), and a revoked token, a disabled caller or a changed
scope takes effect within that time. Concurrent misses for one credential share a single
database lookup. A token accepted in memory in the last part of its entry's life
(AUTH_REFRESH_AHEAD_SHARE) is looked up again behind the call, so a credential in steady use
never expires under its callers: without that, every call arriving while the one lookup ran
waited for it, once per `cache_ttl_seconds`. Only the lookup renews an entry, so no answer is
older than `cache_ttl_seconds`, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import grpc

from server.status import permission_denied, unauthenticated
from store import limits
from store.callers import CallerRecord, CallerStore, Scope, token_digest

AUTHORIZATION_HEADER: Final = "authorization"

# The scope each RPC of credits.v1.CreditsService needs.
METHOD_SCOPES: Final[Mapping[str, Scope]] = {
    "CheckCredits": Scope.READ,
    "History": Scope.READ,
    "Reserve": Scope.SPEND,
    "Commit": Scope.SPEND,
    "Release": Scope.SPEND,
    "AddCredits": Scope.GRANT,
    "SetAccountStatus": Scope.ADMIN,
    "ClawBack": Scope.ADMIN,
}

Context = grpc.aio.ServicerContext[Any, Any]
_CacheKey = tuple[str, ...]


class AuthFailure(Exception):
    """The call may not proceed; `status` is what the caller gets (never carrying a secret)."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


def _invalid(message: str) -> AuthFailure:
    return AuthFailure(unauthenticated("CREDENTIAL_INVALID", message))


def authorization_headers(metadata: Iterable[tuple[str, str | bytes]]) -> list[str | bytes]:
    return [value for key, value in metadata if key == AUTHORIZATION_HEADER]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>` header; None when there is none.
    The messages never quote the header: it may be a real secret sent in the wrong shape."""
    values = authorization_headers(metadata)
    if not values:
        return None
    if len(values) > 1:
        raise _invalid(f"the call carries {len(values)} authorization headers; send exactly one")
    value = values[0]
    scheme, _, token = value.strip().partition(" ") if isinstance(value, str) else ("", "", "")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _invalid("the authorization header must be 'Bearer <token>'")
    if len(token) > limits.BEARER_TOKEN_LENGTH_MAX or not limits.VISIBLE_ASCII_PATTERN.fullmatch(
        token
    ):
        raise _invalid(
            f"the bearer token is malformed: a token is at most {limits.BEARER_TOKEN_LENGTH_MAX} "
            "visible ASCII characters"
        )
    return token


def certificate_identities(context: Context) -> tuple[str, ...]:
    """The verified client certificate's SANs, then its subject CN; () without one. gRPC only
    fills these in after verifying the certificate against the configured client CA."""
    auth_context = context.auth_context()
    names: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for raw in auth_context.get(key, ()):
            name = raw.decode(errors="replace")
            if name and name not in names:
                names.append(name)
    return tuple(names[: limits.CERTIFICATE_IDENTITIES_MAX])


class _TtlCache:
    """Bounded map of lookups to their answers (None included), each valid for ttl seconds."""

    def __init__(self, ttl_seconds: float, monotonic: Callable[[], float]) -> None:
        self.ttl_seconds = ttl_seconds
        self._monotonic = monotonic
        self._entries: dict[_CacheKey, tuple[float, CallerRecord | None]] = {}

    def get(self, key: _CacheKey) -> tuple[bool, CallerRecord | None]:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._monotonic():
            return False, None
        return True, entry[1]

    def expires_at(self, key: _CacheKey) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(
        self, key: _CacheKey, caller: CallerRecord | None, expires_at: float | None = None
    ) -> None:
        if self.ttl_seconds <= 0:
            return
        now = self._monotonic()
        if len(self._entries) >= limits.AUTH_CACHE_ENTRIES_MAX:
            self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
            if len(self._entries) >= limits.AUTH_CACHE_ENTRIES_MAX:
                # Full of live entries (a flood of distinct credentials): start over rather than
                # grow; the cost is one database lookup per credential in use.
                self._entries.clear()
        self._entries[key] = (now + self.ttl_seconds if expires_at is None else expires_at, caller)


def _refusal(method: str, caller: CallerRecord, account_id: object) -> AuthFailure | None:
    """Why this caller may not make this call on this account, or None when it may."""
    # An RPC missing from the table needs the widest scope: a new RPC is closed by default.
    scope = METHOD_SCOPES.get(method, Scope.ADMIN)
    if scope not in caller.scopes:
        held = ", ".join(sorted(caller.scopes)) or "none"
        return AuthFailure(
            permission_denied(
                "SCOPE_MISSING",
                f"{method} needs scope {scope}, which caller {caller.name!r} does not hold "
                f"(it holds: {held}); an administrator can grant it with `credits-server "
                f"callers grant {caller.name} --scope {scope}`",
                {"caller": caller.name, "method": method, "scope": scope.value},
            )
        )
    # An undecodable request has no account; it is refused as INVALID_ARGUMENT next.
    if isinstance(account_id, str) and not caller.may_use_account(account_id):
        prefixes = ", ".join(repr(p) for p in caller.account_prefixes)
        shown = account_id[: limits.ACCOUNT_ID_LENGTH_MAX]
        return AuthFailure(
            permission_denied(
                "ACCOUNT_NOT_ALLOWED",
                f"caller {caller.name!r} may only use accounts starting with {prefixes}; "
                f"account {shown!r} does not. Use an account under those prefixes, or ask "
                "an administrator to widen them (`credits-server callers restrict`)",
                {
                    "caller": caller.name,
                    "account_id": shown,
                    "account_prefixes": ",".join(caller.account_prefixes),
                },
            )
        )
    return None


class Authenticator:
    def __init__(
        self,
        store: CallerStore,
        cache_ttl_seconds: float = limits.AUTH_CACHE_TTL_SECONDS_DEFAULT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        assert 0 <= cache_ttl_seconds <= limits.AUTH_CACHE_TTL_SECONDS_MAX, cache_ttl_seconds
        self.store = store
        self._cache = _TtlCache(cache_ttl_seconds, monotonic)
        # The authorization header exactly as sent -> its caller, for authorize_in_memory: a
        # hit skips parsing and hashing. Each entry expires with the digest entry it came from,
        # so revocation still takes effect within cache_ttl_seconds. It holds raw tokens, as
        # the call's own metadata does, for no longer than that.
        self._by_header = _TtlCache(cache_ttl_seconds, monotonic)
        self._pending: dict[_CacheKey, asyncio.Future[CallerRecord | None]] = {}
        self._monotonic = monotonic
        # Lookups started ahead of an entry's expiry (by header), until they settle.
        self._refreshing: set[str] = set()

    async def authorize(
        self,
        method: str,
        request: object,
        context: Context,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> CallerRecord:
        """The authenticated caller, if it may make this call on the request's account.
        `metadata`: the call's invocation metadata when the caller already read it."""
        account_id = getattr(request, "account_id", None)
        if metadata is not None and isinstance(account_id, str):
            known = self.authorize_in_memory(method, account_id, metadata)
            if known is not None:
                return known
        caller = await self.authenticate(context, metadata)
        refusal = _refusal(method, caller, account_id)
        if refusal is not None:
            raise refusal
        return caller

    def authorize_in_memory(
        self, method: str, account_id: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> CallerRecord | None:
        """authorize() when its answer is a yes already known in memory, without awaiting;
        None means "ask authorize()", which gives the full answer (and any error)."""
        headers = authorization_headers(metadata)
        if len(headers) != 1 or not isinstance(headers[0], str):
            return None  # none, several or binary: authorize() says what is wrong
        header = headers[0]
        found, caller = self._by_header.get((header,))
        if not found or caller is None or not caller.active:
            return None
        self._refresh_if_due(header)
        return caller if _refusal(method, caller, account_id) is None else None

    @property
    def lookups_ahead(self) -> int:
        """Lookups started ahead of an entry's expiry that have not settled yet."""
        return len(self._refreshing)

    def _refresh_if_due(self, header: str) -> None:
        """Looks the header's token up again, behind the call, once its entry is in the last
        AUTH_REFRESH_AHEAD_SHARE of its life; the entry keeps answering meanwhile."""
        expires_at = self._by_header.expires_at((header,))
        ttl_seconds = self._by_header.ttl_seconds
        if (
            expires_at is None
            or header in self._refreshing
            or expires_at - self._monotonic() > ttl_seconds * limits.AUTH_REFRESH_AHEAD_SHARE
        ):
            return
        # The entry came from this header's token, so it parses; the lookup is the one a miss
        # would make (shared with a miss that comes meanwhile), and _settle runs before
        # _settle_header: callbacks run in the order they were added.
        token = bearer_token(((AUTHORIZATION_HEADER, header),))
        assert token is not None, "an accepted header holds a bearer token"
        digest = token_digest(token)
        key = ("token", digest)
        pending = self._start_lookup(key, lambda: self.store.find_by_token_digest(digest))
        self._refreshing.add(header)
        pending.add_done_callback(lambda done: self._settle_header(header, key, done))

    def _settle_header(
        self, header: str, key: _CacheKey, done: asyncio.Future[CallerRecord | None]
    ) -> None:
        """After _settle: the header's entry follows its token's (a failed lookup renews
        neither, and the entry then expires as it would have)."""
        self._refreshing.discard(header)
        if done.cancelled() or done.exception() is not None:
            return
        self._by_header.put((header,), done.result(), self._cache.expires_at(key))

    async def authenticate(
        self, context: Context, metadata: Sequence[tuple[str, str | bytes]] | None = None
    ) -> CallerRecord:
        """The caller named by the call's bearer token, else by its client certificate."""
        if metadata is None:
            metadata = tuple(context.invocation_metadata() or ())
        token = bearer_token(metadata)
        if token is not None:
            digest = token_digest(token)
            caller = await self._lookup(
                ("token", digest), lambda: self.store.find_by_token_digest(digest), context
            )
            if caller is None:
                raise _invalid(
                    "the bearer token is not valid (unknown or revoked); ask an administrator "
                    "for a new one (`credits-server callers token-create`)"
                )
            expires_at = self._cache.expires_at(("token", digest))
            if expires_at is not None:
                # bearer_token accepted exactly one header, a str.
                self._by_header.put((str(authorization_headers(metadata)[0]),), caller, expires_at)
        else:
            identities = certificate_identities(context)
            if not identities:
                raise AuthFailure(
                    unauthenticated(
                        "CREDENTIAL_MISSING",
                        "this call needs a credential: an 'authorization: Bearer <token>' "
                        "header, or a client certificate on a mutual-TLS listener",
                    )
                )
            caller = await self._lookup(
                ("certificate", *identities),
                lambda: self.store.find_by_identities(identities),
                context,
            )
            if caller is None:
                raise _invalid(
                    f"no registered caller is named by the client certificate's identities "
                    f"({', '.join(identities)}); register one with `credits-server callers add`"
                )
        if not caller.active:
            raise AuthFailure(
                unauthenticated(
                    "CALLER_DISABLED",
                    f"caller {caller.name!r} is disabled; an administrator can enable it with "
                    f"`credits-server callers enable {caller.name}`",
                )
            )
        return caller

    async def _lookup(
        self,
        key: _CacheKey,
        load: Callable[[], Awaitable[CallerRecord | None]],
        context: Context,
    ) -> CallerRecord | None:
        found, caller = self._cache.get(key)
        if found:
            return caller
        pending = self._start_lookup(key, load)
        # Shielded: one caller's deadline must not cancel the lookup others are waiting for.
        async with asyncio.timeout(context.time_remaining()):
            return await asyncio.shield(pending)

    def _start_lookup(
        self, key: _CacheKey, load: Callable[[], Awaitable[CallerRecord | None]]
    ) -> asyncio.Future[CallerRecord | None]:
        """The database lookup of `key` in flight, started if none is: concurrent misses and
        lookups ahead of expiry share one; it fills the cache when it settles."""
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(load())
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._settle(key, done))
        return pending

    def _settle(self, key: _CacheKey, done: asyncio.Future[CallerRecord | None]) -> None:
        self._pending.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return  # not cached: the next call asks the database again
        self._cache.put(key, done.result())
