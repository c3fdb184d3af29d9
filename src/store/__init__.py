"""The ledger: schema, transactions, burn-down and audit. Knows nothing of gRPC."""
