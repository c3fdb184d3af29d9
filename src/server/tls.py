"""TLS for the gRPC listener, optionally mutual (client certificates, docs/auth.md).

With a client CA, gRPC asks every client for a certificate and refuses the handshake without a
valid one: it cannot ask and then accept a client without one. Callers behind such a listener
prove who they are with the certificate (its SAN or CN names the caller) or, on top of it, with
a bearer token.
"""

from __future__ import annotations

import pathlib

import grpc

from server.config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """None when the listener is plaintext (no --tls-cert-file)."""
    if not config.tls_cert_file:
        return None
    key = pathlib.Path(config.tls_key_file).read_bytes()
    chain = pathlib.Path(config.tls_cert_file).read_bytes()
    client_ca = (
        pathlib.Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
