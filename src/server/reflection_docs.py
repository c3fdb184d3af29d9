"""Server reflection that carries the proto comments, so `grpcurl describe` shows the docs.

grpcio-reflection serialises files with FileDescriptor.CopyToProto, which drops comments
(source info). The build writes a descriptor set that keeps them
(credits/v1/credits_descriptor_set.binpb); this adapter hands reflection those full protos and
delegates every other lookup to the default pool.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

DESCRIPTOR_SET_RESOURCE = ("credits.v1", "credits_descriptor_set.binpb")


def load_documented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    package, name = DESCRIPTOR_SET_RESOURCE
    data = resources.files(package).joinpath(name).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f for f in files}


class _DocumentedFile:
    def __init__(self, pool: DocumentedPool, descriptor: FileDescriptor) -> None:
        self._pool = pool
        self._descriptor = descriptor
        self.name = descriptor.name

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [_DocumentedFile(self._pool, d) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802
        documented = self._pool.documented.get(self.name)
        if documented is None:
            self._descriptor.CopyToProto(proto)
        else:
            proto.CopyFrom(documented)


class DocumentedPool:
    """The default descriptor pool, answering file lookups with the commented protos."""

    def __init__(self) -> None:
        self.documented = load_documented_files()
        self._pool = descriptor_pool.Default()

    def FindFileByName(self, name: str) -> _DocumentedFile:  # noqa: N802
        return _DocumentedFile(self, self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:  # noqa: N802
        try:
            return _DocumentedFile(self, self._pool.FindFileContainingSymbol(symbol))
        except KeyError:
            # The default pool does not index methods ("pkg.Service.Method"): look up the service.
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service)
            if method not in found.methods_by_name:
                raise
            return _DocumentedFile(self, found.file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
