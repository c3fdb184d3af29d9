"""JSON forms of ledger values: stored idempotency outcomes and journal grant effects.

Written out field by field (not pickled) so a stored outcome stays readable by ops and by later
versions of the code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from store.errors import (
    AccountLocked,
    BalanceLimitExceeded,
    BusinessFailure,
    InsufficientCredits,
)
from store.model import (
    ClawBackResult,
    EntryKind,
    Grant,
    GrantEffect,
    GrantResult,
    GrantSource,
    JournalEntry,
    Reservation,
    ReservationResult,
    ReservationStatus,
    Slice,
)


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def metadata_to_json(metadata: Mapping[str, str]) -> str:
    return dumps(dict(metadata))


def metadata_from_json(text: str) -> dict[str, str]:
    value = json.loads(text)
    assert isinstance(value, dict)
    return {str(k): str(v) for k, v in value.items()}


def effects_to_json(effects: tuple[GrantEffect, ...]) -> str:
    return dumps(
        [
            [
                e.grant_id,
                e.remaining_delta,
                e.held_delta,
                e.consumed_delta,
                e.expired_delta,
                e.clawed_back_delta,
            ]
            for e in effects
        ]
    )


def effects_from_json(text: str) -> tuple[GrantEffect, ...]:
    # Entries written before clawbacks existed carry five numbers; the sixth defaults to 0.
    return tuple(GrantEffect(str(e[0]), *(int(x) for x in e[1:])) for e in json.loads(text))


def _grant_to_dict(g: Grant) -> dict[str, Any]:
    return {
        "grant_id": g.grant_id,
        "account_id": g.account_id,
        "credit_type": g.credit_type,
        "amount": g.amount,
        "remaining": g.remaining,
        "held": g.held,
        "consumed": g.consumed,
        "expired": g.expired,
        "source": g.source.value,
        "priority": g.priority,
        "effective_at_us": g.effective_at_us,
        "expires_at_us": g.expires_at_us,
        "external_ref": g.external_ref,
        "metadata": dict(g.metadata),
        "created_at_us": g.created_at_us,
        "clawed_back": g.clawed_back,
    }


def _grant_from_dict(d: dict[str, Any]) -> Grant:
    return Grant(**{**d, "source": GrantSource(d["source"]), "metadata": dict(d["metadata"])})


def _reservation_to_dict(r: Reservation) -> dict[str, Any]:
    return {
        "reservation_id": r.reservation_id,
        "account_id": r.account_id,
        "credit_type": r.credit_type,
        "amount": r.amount,
        "status": r.status.value,
        "created_at_us": r.created_at_us,
        "expires_at_us": r.expires_at_us,
        "resolved_at_us": r.resolved_at_us,
        "amount_committed": r.amount_committed,
        "amount_released": r.amount_released,
        "amount_expired": r.amount_expired,
        "action": r.action,
        "request_id": r.request_id,
        "metadata": dict(r.metadata),
        "slices": [[s.grant_id, s.amount] for s in r.slices],
    }


def _reservation_from_dict(d: dict[str, Any]) -> Reservation:
    return Reservation(
        **{
            **d,
            "status": ReservationStatus(d["status"]),
            "metadata": dict(d["metadata"]),
            "slices": tuple(Slice(str(g), int(a)) for g, a in d["slices"]),
        }
    )


def _entry_to_dict(e: JournalEntry) -> dict[str, Any]:
    return {
        "account_id": e.account_id,
        "credit_type": e.credit_type,
        "sequence": e.sequence,
        "kind": e.kind.value,
        "amount": e.amount,
        "available_after": e.available_after,
        "reserved_after": e.reserved_after,
        "grant_id": e.grant_id,
        "reservation_id": e.reservation_id,
        "idempotency_key": e.idempotency_key,
        "principal": e.principal,
        "action": e.action,
        "request_id": e.request_id,
        "created_at_us": e.created_at_us,
        "grant_effects": effects_to_json(e.grant_effects),
    }


def _entry_from_dict(d: dict[str, Any]) -> JournalEntry:
    return JournalEntry(
        **{
            **d,
            "kind": EntryKind(d["kind"]),
            "grant_effects": effects_from_json(d["grant_effects"]),
        }
    )


def _clawback_to_dict(r: ClawBackResult) -> dict[str, Any]:
    return {
        "grant": _grant_to_dict(r.grant),
        "amount_clawed_back": r.amount_clawed_back,
        "amount_requested": r.amount_requested,
        "entry": None if r.entry is None else _entry_to_dict(r.entry),
    }


def _clawback_from_dict(d: dict[str, Any]) -> ClawBackResult:
    return ClawBackResult(
        grant=_grant_from_dict(d["grant"]),
        amount_clawed_back=int(d["amount_clawed_back"]),
        entry=None if d["entry"] is None else _entry_from_dict(d["entry"]),
        amount_requested=int(d["amount_requested"]),
    )


Outcome = GrantResult | ReservationResult | ClawBackResult | BusinessFailure


def outcome_to_json(outcome: Outcome) -> str:
    if isinstance(outcome, GrantResult):
        return dumps(
            {
                "grant_result": {
                    "grant": _grant_to_dict(outcome.grant),
                    "entry": _entry_to_dict(outcome.entry),
                }
            }
        )
    if isinstance(outcome, ReservationResult):
        return dumps(
            {
                "reservation_result": {
                    "reservation": _reservation_to_dict(outcome.reservation),
                    "entry": _entry_to_dict(outcome.entry),
                }
            }
        )
    if isinstance(outcome, ClawBackResult):
        return dumps({"clawback_result": _clawback_to_dict(outcome)})
    if isinstance(outcome, InsufficientCredits):
        return dumps(
            {
                "failure": {
                    "reason": outcome.reason,
                    "account_id": outcome.account_id,
                    "credit_type": outcome.credit_type,
                    "required": outcome.required,
                    "available": outcome.available,
                }
            }
        )
    if isinstance(outcome, AccountLocked):
        return dumps({"failure": {"reason": outcome.reason, "account_id": outcome.account_id}})
    if isinstance(outcome, BalanceLimitExceeded):
        return dumps(
            {
                "failure": {
                    "reason": outcome.reason,
                    "account_id": outcome.account_id,
                    "credit_type": outcome.credit_type,
                    "balance": outcome.balance,
                    "limit": outcome.limit,
                }
            }
        )
    raise AssertionError(f"no stored form for outcome {outcome!r}")


def outcome_from_json(text: str) -> Outcome:
    d = json.loads(text)
    if "grant_result" in d:
        r = d["grant_result"]
        return GrantResult(_grant_from_dict(r["grant"]), _entry_from_dict(r["entry"]))
    if "reservation_result" in d:
        r = d["reservation_result"]
        return ReservationResult(
            _reservation_from_dict(r["reservation"]), _entry_from_dict(r["entry"])
        )
    if "clawback_result" in d:
        return _clawback_from_dict(d["clawback_result"])
    f = d["failure"]
    if f["reason"] == InsufficientCredits.reason:
        return InsufficientCredits(f["account_id"], f["credit_type"], f["required"], f["available"])
    if f["reason"] == AccountLocked.reason:
        return AccountLocked(f["account_id"])
    if f["reason"] == BalanceLimitExceeded.reason:
        return BalanceLimitExceeded(f["account_id"], f["credit_type"], f["balance"], f["limit"])
    raise AssertionError(f"unknown stored failure {f['reason']!r}")
