"""The gRPC server: translates protobuf <-> ledger calls <-> gRPC status, and runs the sweepers."""

import os

from server.grpc_core import apply_defaults

# Before any module of this package imports grpc: its C core reads these once, at load.
apply_defaults(os.environ)
