"""`credits-healthcheck`: exits 0 when a credits server answers SERVING on the standard gRPC
health service, 1 otherwise (the reason on stderr).

The container image's HEALTHCHECK runs it (the image carries no grpc_health_probe binary); it
works as well from a shell: `credits-healthcheck --address 10.0.0.7:50051`. By default it asks
the server of this container: the port of CREDITS_LISTEN, on the loopback address when the
server listens on every interface. A TLS listener needs --tls-ca-file, and a listener that
requires client certificates also --tls-cert-file and --tls-key-file (docs/auth.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS_DEFAULT = 2.0
# A probe that waits longer than this is not a health check any more.
TIMEOUT_SECONDS_MAX = 60.0

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1

_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that signed the server's certificate and, for a
    listener with a client CA, this client's certificate and key."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    # The name to verify in the server's certificate, when not the host of the address.
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return pathlib.Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


def local_address(listen: str) -> str:
    """The address to reach a server listening on `listen` from the same host."""
    host, _, port = listen.rpartition(":")
    return f"{_WILDCARD_HOSTS.get(host, host)}:{port}"


def default_address() -> str:
    listen = os.environ.get("CREDITS_LISTEN")
    if listen is None:
        # Imported only here: the server's configuration imports much of the server (over a
        # second of start-up), which every probe of a container (CREDITS_LISTEN set) skips.
        from server.config import DEFAULT_LISTEN

        listen = DEFAULT_LISTEN
    return local_address(listen)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credits-healthcheck",
        description="Exit 0 if the credits server reports SERVING (grpc.health.v1), else 1.",
    )
    p.add_argument(
        "--address",
        help="host:port of the server (default: the port of CREDITS_LISTEN on this host)",
    )
    p.add_argument(
        "--service",
        default="",
        help="service name to ask about (default '': the whole server; "
        "'credits.v1.CreditsService' also answers)",
    )
    p.add_argument(
        "--timeout-seconds",
        type=float,
        default=TIMEOUT_SECONDS_DEFAULT,
        help=f"deadline of the check (default {TIMEOUT_SECONDS_DEFAULT:g})",
    )
    p.add_argument("--tls-ca-file", default="", help="PEM CA bundle: connect with TLS")
    p.add_argument("--tls-cert-file", default="", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key-file", default="", help="PEM key of --tls-cert-file")
    p.add_argument(
        "--tls-server-name",
        default="",
        help="name to verify in the server's certificate (default: the host of --address)",
    )
    return p


def check(
    address: str, service: str, timeout_seconds: float, tls: TlsFiles | None = None
) -> str | None:
    """None when `service` at `address` is SERVING, else why not."""
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            name = code.name if code is not None else "UNKNOWN"
            return f"health check of {address} failed: {name}: {details}"
        status: int = response.status
        if status == health_pb2.HealthCheckResponse.SERVING:
            return None
        status_name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        return f"{address} reports {status_name} for service {service!r}"


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not 0 < args.timeout_seconds <= TIMEOUT_SECONDS_MAX:
        p.error(f"--timeout-seconds must be in (0, {TIMEOUT_SECONDS_MAX:g}]")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        p.error("--tls-cert-file and --tls-key-file go together")
    if (args.tls_cert_file or args.tls_server_name) and not args.tls_ca_file:
        p.error("--tls-cert-file and --tls-server-name need --tls-ca-file")
    tls = (
        TlsFiles(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)
        if args.tls_ca_file
        else None
    )
    address = args.address or default_address()
    try:
        problem = check(address, args.service, args.timeout_seconds, tls)
    except OSError as error:
        problem = f"cannot read a TLS file: {error}"
    if problem is not None:
        print(f"credits-healthcheck: {problem}", file=sys.stderr)
        sys.exit(EXIT_NOT_SERVING)
    sys.exit(EXIT_SERVING)


if __name__ == "__main__":
    main()
