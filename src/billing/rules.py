"""What a payment is worth in credits: pure functions, no I/O, testable on their own.

Idempotency keys are derived from Stripe ids only, never from the event or the time it is
processed, so the ledger deduplicates a grant however many times and in whatever order its
events arrive, and whichever listener (or inbox) processes them:

- a pack purchase: `stripe:<checkout session id>:<credit type>`
- a subscription period's allocation: `stripe:<invoice id>:<credit type>`
- an upgrade's top-up: `stripe:<invoice id>:<credit type>:upgrade`
- a refund's clawback: `stripe:refund:<charge id>:<amount_refunded>:<grant kind>:<credit type>`
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from billing import limits
from billing.config import PackPrice, PlanPrice
from billing.errors import Refused
from billing.stripe_objects import InvoiceLine, LineItem

GrantKind = Literal["purchase", "allocation", "upgrade"]


@dataclass(frozen=True)
class GrantPlan:
    """One AddCredits call to make. Every field is a function of Stripe data and the config, so
    the request is identical each time the event (or its sibling) is processed."""

    account_id: str
    credit_type: str
    amount: int
    idempotency_key: str
    kind: GrantKind
    # The Checkout Session or invoice the credits pay for (the grant's external_ref).
    stripe_ref: str
    payment_intent: str | None = None
    expires_at_s: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert 0 < self.amount <= limits.AMOUNT_MAX, f"grant amount out of range: {self}"
        assert len(self.idempotency_key) <= limits.IDEMPOTENCY_KEY_LENGTH_MAX, self


def checked_account_id(account_id: str | None, where: str) -> str:
    """The account id, if it is one the credits service accepts (its contract's format)."""
    if not account_id:
        raise Refused(f"{where} names no account: set client_reference_id or metadata.account_id")
    if len(account_id) > limits.ACCOUNT_ID_LENGTH_MAX or not limits.ACCOUNT_ID_PATTERN.fullmatch(
        account_id
    ):
        raise Refused(
            f"{where} names account {account_id[:140]!r}, which is not an account id: 1.."
            f"{limits.ACCOUNT_ID_LENGTH_MAX} characters of [A-Za-z0-9._:@/+-], starting with a "
            "letter or digit"
        )
    return account_id


def purchase_key(session_id: str, credit_type: str) -> str:
    return _key(f"stripe:{session_id}:{credit_type}")


def allocation_key(invoice_id: str, credit_type: str) -> str:
    return _key(f"stripe:{invoice_id}:{credit_type}")


def upgrade_key(invoice_id: str, credit_type: str) -> str:
    return _key(f"stripe:{invoice_id}:{credit_type}:upgrade")


def refund_key(charge_id: str, amount_refunded: int, kind: str, credit_type: str) -> str:
    return _key(f"stripe:refund:{charge_id}:{amount_refunded}:{kind}:{credit_type}")


def _key(key: str) -> str:
    if len(key) > limits.IDEMPOTENCY_KEY_LENGTH_MAX:
        raise Refused(
            f"idempotency key {key[:60]}... is longer than the "
            f"{limits.IDEMPOTENCY_KEY_LENGTH_MAX} characters the credits service accepts"
        )
    return key


# ---- packs --------------------------------------------------------------------------------


def purchase_grants(
    account_id: str,
    session_id: str,
    payment_intent: str | None,
    line_items: Iterable[LineItem],
    packs: Mapping[str, PackPrice],
) -> list[GrantPlan]:
    """One grant per credit type bought in the session: the sum of units x credits_per_unit
    over its pack lines. Lines of prices that are not packs are not ours and are skipped."""
    credits_by_type: dict[str, int] = {}
    seen_prices: list[str] = []
    for item in line_items:
        seen_prices.append(item.price_id)
        pack = packs.get(item.price_id)
        if pack is None:
            continue
        if not 1 <= item.quantity <= limits.PACK_QUANTITY_MAX:
            raise Refused(
                f"session {session_id} buys {item.quantity} units of {item.price_id}; "
                f"a purchase is 1..{limits.PACK_QUANTITY_MAX} units"
            )
        credits = item.quantity * pack.credits_per_unit
        credits_by_type[pack.credit_type] = credits_by_type.get(pack.credit_type, 0) + credits
    if not credits_by_type:
        raise Refused(
            f"session {session_id} has no line with a configured pack price (its prices: "
            f"{', '.join(seen_prices) or 'none'}); add the price to [[packs]] and replay"
        )
    return [
        GrantPlan(
            account_id=account_id,
            credit_type=credit_type,
            amount=_bounded(credits, session_id),
            idempotency_key=purchase_key(session_id, credit_type),
            kind="purchase",
            stripe_ref=session_id,
            payment_intent=payment_intent,
            metadata={"stripe_checkout_session": session_id},
        )
        for credit_type, credits in sorted(credits_by_type.items())
    ]


def _bounded(credits: int, ref: str) -> int:
    if credits > limits.AMOUNT_MAX:
        raise Refused(f"{ref} is worth {credits} credits, above one grant's {limits.AMOUNT_MAX}")
    return credits


def refund_target(credits_granted: int, charge_amount: int, amount_refunded: int) -> int:
    """Credits a charge's refunds claim back in total: the refunded share of the grant, rounded
    down (a partial credit stays with the customer). Refunds only grow, so this only grows."""
    if charge_amount <= 0:
        return 0
    refunded = min(max(amount_refunded, 0), charge_amount)
    return credits_granted * refunded // charge_amount


# ---- subscriptions --------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodAllocation:
    """The credits one paid subscription period brings, for one credit type."""

    credit_type: str
    period_start_s: int
    period_end_s: int
    level_credits: int
    expires_at_s: int


@dataclass(frozen=True)
class UpgradeLevel:
    """A mid-period plan change: the new allocation level from `change_at_s` to the period end."""

    credit_type: str
    change_at_s: int
    period_end_s: int
    level_credits: int
    expires_at_s: int


def configured_lines(
    lines: Iterable[InvoiceLine], plans: Mapping[str, PlanPrice]
) -> list[tuple[InvoiceLine, PlanPrice]]:
    return [
        (line, plans[line.price_id])
        for line in lines
        if line.price_id is not None and line.price_id in plans
    ]


def period_allocations(
    lines: Iterable[tuple[InvoiceLine, PlanPrice]], invoice_id: str
) -> list[PeriodAllocation]:
    """The regular (non-proration) plan lines, summed per credit type and period."""
    levels: dict[tuple[str, int, int], tuple[int, int]] = {}
    for line, plan in lines:
        if line.proration:
            continue
        _check_line(line, invoice_id)
        group = (plan.credit_type, line.period_start_s, line.period_end_s)
        level, grace = levels.get(group, (0, 0))
        levels[group] = (
            level + line.quantity * plan.credits_per_period,
            max(grace, plan.expiry_grace_seconds),
        )
    return [
        PeriodAllocation(
            credit_type=credit_type,
            period_start_s=start_s,
            period_end_s=end_s,
            level_credits=_bounded(level, invoice_id),
            expires_at_s=end_s + grace,
        )
        for (credit_type, start_s, end_s), (level, grace) in sorted(levels.items())
    ]


def upgrade_levels(
    lines: Iterable[tuple[InvoiceLine, PlanPrice]], invoice_id: str
) -> list[UpgradeLevel]:
    """The plan a proration switched to: its positive ("remaining time on ...") lines, summed per
    credit type. The negative lines ("unused time on ...") describe the old plan, whose level
    the listener already knows from the period's allocation; they grant and take nothing."""
    levels: dict[tuple[str, int], tuple[int, int, int]] = {}
    for line, plan in lines:
        if not line.proration or line.amount <= 0:
            continue
        _check_line(line, invoice_id)
        group = (plan.credit_type, line.period_end_s)
        level, change_at_s, grace = levels.get(group, (0, line.period_start_s, 0))
        levels[group] = (
            level + line.quantity * plan.credits_per_period,
            min(change_at_s, line.period_start_s),
            max(grace, plan.expiry_grace_seconds),
        )
    return [
        UpgradeLevel(
            credit_type=credit_type,
            change_at_s=change_at_s,
            period_end_s=end_s,
            level_credits=_bounded(level, invoice_id),
            expires_at_s=end_s + grace,
        )
        for (credit_type, end_s), (level, change_at_s, grace) in sorted(levels.items())
    ]


def _check_line(line: InvoiceLine, invoice_id: str) -> None:
    if not 1 <= line.quantity <= limits.PLAN_QUANTITY_MAX:
        raise Refused(
            f"invoice {invoice_id} has a line of {line.quantity} seats of {line.price_id}; "
            f"a line is 1..{limits.PLAN_QUANTITY_MAX} seats"
        )
    if line.period_end_s <= line.period_start_s:
        raise Refused(f"invoice {invoice_id} has a line whose period ends before it starts")


def upgrade_top_up(
    level_new: int, level_old: int, period_start_s: int, period_end_s: int, change_at_s: int
) -> int:
    """Credits an upgrade grants: the difference between the two plans' allocations, for the
    share of the period that is left, rounded down. Stripe charges the price difference the same
    way, so a last-day upgrade brings a day's worth of the difference, not a month's. A change
    to an equal or lower level grants nothing: downgrades apply from the next period."""
    assert period_end_s > period_start_s, "a recorded period has a positive length"
    difference = level_new - level_old
    if difference <= 0:
        return 0
    period_s = period_end_s - period_start_s
    remaining_s = min(max(period_end_s - change_at_s, 0), period_s)
    return difference * remaining_s // period_s
