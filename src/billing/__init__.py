"""Stripe listener: verifies Stripe webhooks, keeps them in a durable inbox, and turns them into
credits-service calls (AddCredits, ClawBack, SetAccountStatus) over gRPC. See docs/billing.md."""
