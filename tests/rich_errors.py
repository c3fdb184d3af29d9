"""Reads the google.rpc.Status details the server sends, the way a client would."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return status_pb2.Status()


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for detail in rich_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    return "" if info is None else info.reason


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    for detail in rich_status(error).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return [(v.field, v.description) for v in bad.field_violations]
    return []
