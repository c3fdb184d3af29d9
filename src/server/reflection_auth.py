"""Server reflection that serves only authenticated callers (`--reflection-requires-auth`).

Reflection is open by default so `grpcurl list` and `describe` work without a credential (the
contract is no secret). Where the service list itself should not be visible to strangers, this
servicer asks for the same credential as the RPCs do; any valid caller may use it, whatever its
scopes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from server.auth import Authenticator, AuthFailure

# grpcio-reflection's servicer for grpc.aio servers (the package ships no type hints).
_AioReflectionServicer: Any = reflection.aio.ReflectionServicer  # type: ignore[attr-defined]


class AuthenticatedReflectionServicer(_AioReflectionServicer):  # type: ignore[misc]
    def __init__(
        self, service_names: Iterable[str], pool: object, authenticator: Authenticator
    ) -> None:
        super().__init__(service_names, pool=pool)
        self._authenticator = authenticator

    async def ServerReflectionInfo(  # noqa: N802 - gRPC's name
        self, request_iterator: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            await self._authenticator.authenticate(context)
        except AuthFailure as failure:
            await context.abort(
                failure.status.code, failure.status.details, failure.status.trailing_metadata
            )
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response


def enable_authenticated_reflection(
    service_names: Iterable[str], server: grpc.aio.Server, pool: object, auth: Authenticator
) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        AuthenticatedReflectionServicer(service_names, pool, auth), server
    )
