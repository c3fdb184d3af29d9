"""Checks the Stripe-Signature header with the `stripe` library, against each signing secret.

Several secrets are accepted at once so an endpoint's secret can be rolled: Stripe signs with
both during the overlap, and the listener accepts either until the old one is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import stripe

from billing import limits


class SignatureRejected(Exception):
    """The body is not a delivery from Stripe (or not a recent one); the message says why."""


def verify(payload: str, header: str | None, secrets: Sequence[str]) -> None:
    """Returns when some secret's HMAC-SHA256 of "t.payload" matches and t is recent."""
    if not header:
        raise SignatureRejected("no Stripe-Signature header: only Stripe's deliveries are accepted")
    assert secrets, "the listener refuses to start without signing secrets"
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(
                payload, header, secret, limits.SIGNATURE_TOLERANCE_SECONDS
            )
            return
        except stripe.SignatureVerificationError as error:
            # The library checks the signature first, the timestamp after: a "tolerance" error
            # means this secret signed the body, too long ago.
            if "tolerance" in str(error):
                stale = True
            elif "Unable to extract" in str(error):
                raise SignatureRejected(
                    "the Stripe-Signature header is malformed (expected t=<unix time>,v1=<hex>)"
                ) from error
    if stale:
        raise SignatureRejected(
            f"the signature's timestamp is more than {limits.SIGNATURE_TOLERANCE_SECONDS} s old: "
            "a replayed or much delayed delivery is refused"
        )
    raise SignatureRejected(
        "no v1 signature in Stripe-Signature matches the body under any configured signing "
        "secret: the body was altered, or the secret is wrong"
    )
