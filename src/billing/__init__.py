"""Stripe listener: turns Stripe events into AddCredits calls over gRPC. Not built yet."""
