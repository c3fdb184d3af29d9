"""Turns one stored Stripe event into credits-service calls. One function per event type.

Each handler is safe to run again from the start: grants are skipped when the listener already
recorded them and deduplicated by the ledger under keys derived from Stripe ids, clawbacks and
status changes likewise. So a crash at any point, a retry, a redelivery or a replay changes
nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from billing import rules, stripe_objects
from billing.config import ListenerConfig
from billing.credits_gateway import CreditsGateway
from billing.errors import Refused, RetryLater
from billing.records import Clawback, DisputeRecord, RecordedGrant, Records
from billing.rules import GrantPlan
from billing.stripe_api import StripeApi
from billing.stripe_objects import Envelope, LineItem

log = logging.getLogger("credits.listener")


@dataclass(frozen=True)
class Result:
    status: Literal["done", "ignored"]
    outcome: str


Handler = Callable[["Processor", Envelope], Awaitable[Result]]


class Processor:
    def __init__(
        self,
        config: ListenerConfig,
        credits: CreditsGateway,
        records: Records,
        stripe_api: StripeApi | None,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._credits = credits
        self._records = records
        self._stripe_api = stripe_api
        self._now_s = clock_s

    async def process(self, envelope: Envelope) -> Result:
        handler = _HANDLERS.get(envelope.event_type)
        if handler is None:
            return Result("ignored", f"{envelope.event_type} is not an event the listener acts on")
        return await handler(self, envelope)

    # ---- checkout -----------------------------------------------------------------------------

    async def checkout_paid(self, envelope: Envelope) -> Result:
        session = stripe_objects.checkout_session(envelope.obj)
        if session.mode == "subscription" and session.subscription_id is not None:
            # Credits come with the subscription's invoices; remember whose it is for them.
            account_id = rules.checked_account_id(session.account_id, session.session_id)
            await self._records.remember_subscription(session.subscription_id, account_id)
            return Result("done", f"subscription {session.subscription_id} is {account_id}'s")
        if session.mode != "payment":
            return Result("ignored", f"checkout session in mode {session.mode}")
        if session.payment_status not in ("paid", "no_payment_required"):
            return Result(
                "done",
                f"session {session.session_id} is {session.payment_status}: credits come with "
                "checkout.session.async_payment_succeeded",
            )
        account_id = rules.checked_account_id(session.account_id, session.session_id)
        line_items = await self._line_items(session)
        plans = rules.purchase_grants(
            account_id,
            session.session_id,
            session.payment_intent,
            line_items,
            self._config.packs,
        )
        granted = [await self._grant(plan, envelope.event_id) for plan in plans]
        return Result("done", "; ".join(granted))

    async def _line_items(self, session: stripe_objects.CheckoutSession) -> list[LineItem]:
        """From Stripe's API when the listener has a key (what was really bought), else from
        the metadata the listener's own purchase flow wrote on the session."""
        if self._stripe_api is not None:
            return await self._stripe_api.line_items(session.session_id)
        price_id = session.metadata.get("price_id")
        quantity = session.metadata.get("quantity", "")
        if price_id and quantity.isdigit():
            return [LineItem(price_id, int(quantity))]
        raise Refused(
            f"session {session.session_id}: no STRIPE_API_KEY to list its line items, and no "
            "price_id/quantity metadata from the listener's purchase flow"
        )

    async def _grant(self, plan: GrantPlan, request_id: str) -> str:
        recorded = await self._records.grant(plan.idempotency_key)
        if recorded is not None:
            return f"{plan.idempotency_key} already granted ({recorded.grant_id})"
        grant_id = await self._credits.add_credits(plan, request_id)
        await self._records.record_grant(plan, grant_id)
        log.info(
            "granted",
            extra={
                "fields": {
                    "account_id": plan.account_id,
                    "amount": plan.amount,
                    "credit_type": plan.credit_type,
                    "idempotency_key": plan.idempotency_key,
                    "grant_id": grant_id,
                    "event_id": request_id,
                }
            },
        )
        return f"granted {plan.amount} {plan.credit_type} to {plan.account_id} ({grant_id})"

    # ---- subscriptions ------------------------------------------------------------------------

    async def invoice_paid(self, envelope: Envelope) -> Result:
        invoice = stripe_objects.invoice(envelope.obj)
        subscription_id = invoice.subscription_id
        if subscription_id is None:
            return Result("ignored", f"invoice {invoice.invoice_id} is not a subscription's")
        if not invoice.lines_complete:
            raise Refused(
                f"invoice {invoice.invoice_id} has more lines than its event carries "
                "(lines.has_more); grant its credits by hand"
            )
        lines = rules.configured_lines(invoice.lines, self._config.plans)
        if not lines:
            prices = sorted({line.price_id or "?" for line in invoice.lines})
            raise Refused(
                f"invoice {invoice.invoice_id} has no line with a configured plan price (its "
                f"prices: {', '.join(prices) or 'none'}); add the price to [[plans]] and replay"
            )
        account_id = await self._subscription_account(subscription_id, invoice.account_id)
        subscription = await self._records.subscription(subscription_id)
        ended_at_s = subscription.ended_at_s if subscription is not None else None
        notes: list[str] = []
        for allocation in rules.period_allocations(lines, invoice.invoice_id):
            notes.append(
                await self._allocate(invoice, subscription_id, account_id, allocation, ended_at_s)
            )
        for level in rules.upgrade_levels(lines, invoice.invoice_id):
            notes.append(await self._upgrade(invoice, subscription_id, account_id, level))
        if not notes:
            notes.append("no allocation: the invoice only credits unused time (a downgrade)")
        return Result("done", "; ".join(notes))

    async def _subscription_account(self, subscription_id: str, from_invoice: str | None) -> str:
        if from_invoice is not None:
            account_id = rules.checked_account_id(from_invoice, subscription_id)
            await self._records.remember_subscription(subscription_id, account_id)
            return account_id
        known = await self._records.subscription(subscription_id)
        if known is None or known.account_id is None:
            # Its Checkout Session's event may simply not have been processed yet.
            raise RetryLater(
                f"whose subscription {subscription_id} is, is not known yet: set "
                "metadata.account_id on the subscription, or start it with a Checkout Session "
                "whose client_reference_id is the account"
            )
        return known.account_id

    async def _allocate(
        self,
        invoice: stripe_objects.Invoice,
        subscription_id: str,
        account_id: str,
        allocation: rules.PeriodAllocation,
        ended_at_s: int | None,
    ) -> str:
        if ended_at_s is not None and allocation.period_start_s >= ended_at_s:
            return f"subscription {subscription_id} ended: no allocation for a later period"
        if allocation.expires_at_s <= self._now_s():
            return f"the period ending {allocation.period_end_s} is over: nothing to allocate"
        note = await self._grant(
            GrantPlan(
                account_id=account_id,
                credit_type=allocation.credit_type,
                amount=allocation.level_credits,
                idempotency_key=rules.allocation_key(invoice.invoice_id, allocation.credit_type),
                kind="allocation",
                stripe_ref=invoice.invoice_id,
                payment_intent=invoice.payment_intent,
                expires_at_s=allocation.expires_at_s,
                metadata=_subscription_metadata(invoice, subscription_id),
            ),
            invoice.invoice_id,
        )
        await self._records.raise_period_level(
            subscription_id,
            allocation.credit_type,
            allocation.period_start_s,
            allocation.period_end_s,
            allocation.level_credits,
        )
        return note

    async def _upgrade(
        self,
        invoice: stripe_objects.Invoice,
        subscription_id: str,
        account_id: str,
        level: rules.UpgradeLevel,
    ) -> str:
        period = await self._records.period(subscription_id, level.period_end_s, level.credit_type)
        if period is None:
            # The period's own invoice carries its length and level; wait for it.
            raise RetryLater(
                f"invoice {invoice.invoice_id} changes the plan of the period of "
                f"{subscription_id} ending {level.period_end_s}, whose allocation the listener "
                "has not recorded (yet)"
            )
        top_up = rules.upgrade_top_up(
            level.level_credits,
            period.level_credits,
            period.period_start_s,
            period.period_end_s,
            level.change_at_s,
        )
        if top_up > 0 and level.expires_at_s > self._now_s():
            note = await self._grant(
                GrantPlan(
                    account_id=account_id,
                    credit_type=level.credit_type,
                    amount=top_up,
                    idempotency_key=rules.upgrade_key(invoice.invoice_id, level.credit_type),
                    kind="upgrade",
                    stripe_ref=invoice.invoice_id,
                    payment_intent=invoice.payment_intent,
                    expires_at_s=level.expires_at_s,
                    metadata=_subscription_metadata(invoice, subscription_id),
                ),
                invoice.invoice_id,
            )
        else:
            note = (
                f"plan change to {level.level_credits} {level.credit_type} per period (from "
                f"{period.level_credits}): nothing to top up; a lower level applies next period"
            )
        await self._records.raise_period_level(
            subscription_id,
            level.credit_type,
            period.period_start_s,
            period.period_end_s,
            level.level_credits,
        )
        return note

    async def subscription_deleted(self, envelope: Envelope) -> Result:
        ended = stripe_objects.subscription_ended(envelope.obj, envelope.created_s)
        await self._records.remember_subscription(
            ended.subscription_id, ended.account_id, ended.ended_at_s
        )
        return Result(
            "done",
            f"subscription {ended.subscription_id} ended at {ended.ended_at_s}: no further "
            "allocations; credits already granted stay until they expire",
        )

    # ---- refunds and disputes -----------------------------------------------------------------

    async def charge_refunded(self, envelope: Envelope) -> Result:
        charge = stripe_objects.charge(envelope.obj)
        if charge.payment_intent is None:
            return Result("ignored", f"charge {charge.charge_id} has no payment intent")
        grants = await self._records.grants_for_payment(charge.payment_intent)
        if not grants:
            raise RetryLater(
                f"no grant recorded for payment {charge.payment_intent} of charge "
                f"{charge.charge_id} (yet): its purchase event may still be on its way; if "
                "it never was a credits purchase, leave this event parked"
            )
        notes: list[str] = []
        for grant in grants:
            notes.append(await self._claw_back_share(charge, grant, envelope.event_id))
        return Result("done", "; ".join(notes))

    async def _claw_back_share(
        self, charge: stripe_objects.Charge, grant: RecordedGrant, request_id: str
    ) -> str:
        target = rules.refund_target(grant.amount, charge.amount, charge.amount_refunded)
        already = await self._records.clawback_target(grant.idempotency_key)
        amount = target - already
        if amount <= 0:
            return f"grant {grant.grant_id}: refunds up to {charge.amount_refunded} already handled"
        key = rules.refund_key(
            charge.charge_id, charge.amount_refunded, grant.kind, grant.credit_type
        )
        result = await self._credits.claw_back(
            grant.account_id, grant.grant_id, amount, key, request_id
        )
        await self._records.record_clawback(
            Clawback(
                idempotency_key=key,
                grant_key=grant.idempotency_key,
                charge_id=charge.charge_id,
                amount_refunded=charge.amount_refunded,
                target_credits=target,
                amount_requested=amount,
                amount_clawed_back=result.amount_clawed_back,
                shortfall=result.shortfall,
            )
        )
        if result.shortfall:
            log.warning(
                "clawback short",
                extra={
                    "fields": {
                        "account_id": grant.account_id,
                        "grant_id": grant.grant_id,
                        "requested": amount,
                        "shortfall": result.shortfall,
                        "event_id": request_id,
                    }
                },
            )
        return (
            f"clawed back {result.amount_clawed_back} of {amount} {grant.credit_type} from "
            f"{grant.account_id} ({grant.grant_id}), {result.shortfall} short"
        )

    async def dispute_created(self, envelope: Envelope) -> Result:
        dispute = stripe_objects.dispute(envelope.obj)
        known = await self._records.dispute(dispute.dispute_id)
        if known is not None and known.closed:
            return Result("done", f"dispute {dispute.dispute_id} already closed: no lock")
        account_id = await self._dispute_account(dispute, known)
        await self._records.record_dispute(
            dispute.dispute_id, account_id, dispute.payment_intent or "", dispute.status, False
        )
        if not self._config.disputes.lock_on_created:
            return Result("done", f"dispute {dispute.dispute_id} on {account_id}: locking is off")
        changed = await self._credits.set_locked(
            account_id,
            True,
            f"stripe dispute {dispute.dispute_id} opened on charge {dispute.charge_id}",
            envelope.event_id,
        )
        return Result(
            "done",
            f"{account_id} {'locked' if changed else 'already locked'} by {dispute.dispute_id}",
        )

    async def dispute_closed(self, envelope: Envelope) -> Result:
        dispute = stripe_objects.dispute(envelope.obj)
        known = await self._records.dispute(dispute.dispute_id)
        account_id = await self._dispute_account(dispute, known)
        await self._records.record_dispute(
            dispute.dispute_id, account_id, dispute.payment_intent or "", dispute.status, True
        )
        if dispute.status not in self._config.disputes.unlock_on:
            return Result(
                "done",
                f"dispute {dispute.dispute_id} closed {dispute.status}: {account_id} stays "
                "as it is",
            )
        still_open = await self._records.open_disputes(account_id)
        if still_open:
            return Result(
                "done",
                f"dispute {dispute.dispute_id} closed {dispute.status}, but {account_id} has "
                f"open disputes ({', '.join(still_open)}): stays locked",
            )
        changed = await self._credits.set_locked(
            account_id,
            False,
            f"stripe dispute {dispute.dispute_id} closed: {dispute.status}",
            envelope.event_id,
        )
        return Result(
            "done",
            f"{account_id} {'unlocked' if changed else 'was not locked'}: dispute "
            f"{dispute.dispute_id} {dispute.status}",
        )

    async def _dispute_account(
        self, dispute: stripe_objects.Dispute, known: DisputeRecord | None
    ) -> str:
        if known is not None:
            return known.account_id
        if dispute.payment_intent is None:
            raise Refused(f"dispute {dispute.dispute_id} names no payment intent")
        grants = await self._records.grants_for_payment(dispute.payment_intent)
        if not grants:
            raise RetryLater(
                f"no grant recorded for payment {dispute.payment_intent} disputed by "
                f"{dispute.dispute_id} (yet): lock the account by hand if it is a customer's"
            )
        return grants[0].account_id


def _subscription_metadata(invoice: stripe_objects.Invoice, subscription_id: str) -> dict[str, str]:
    return {"stripe_invoice": invoice.invoice_id, "stripe_subscription": subscription_id}


_HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": Processor.checkout_paid,
    "checkout.session.async_payment_succeeded": Processor.checkout_paid,
    "invoice.paid": Processor.invoice_paid,
    "customer.subscription.deleted": Processor.subscription_deleted,
    "charge.refunded": Processor.charge_refunded,
    "charge.dispute.created": Processor.dispute_created,
    "charge.dispute.closed": Processor.dispute_closed,
}
