"""The gRPC server: translates protobuf <-> ledger calls <-> gRPC status, and runs the sweepers."""
