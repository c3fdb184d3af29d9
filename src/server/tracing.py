"""OpenTelemetry tracing of the CreditsService calls, off unless an OTLP endpoint is configured.

When on, OpenTelemetry's gRPC aio server interceptor opens one span per CreditsService call
(continuing the caller's trace when its metadata carries a `traceparent`), records the gRPC
status code, and a batch span processor sends the spans to the OTLP gRPC endpoint in the
background. The health and reflection services are not traced: probes every few seconds would
drown the calls that matter.

When off, no interceptor is installed at all, so a call pays nothing for tracing.

Each server gets its own TracerProvider (the global one is left alone), so several servers in
one process trace independently. `exporting_to` is the hook that sends spans to another
exporter than OTLP (an in-memory one in tests, a console one when debugging).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

TRACED_SERVICE_PREFIX = "credits.v1."
SERVICE_NAME_VALUE = "credits-server"
# On shutdown, queued spans get this long to reach the collector before they are dropped.
SHUTDOWN_FLUSH_TIMEOUT_MS = 5_000

_exporter_override: SpanExporter | None = None


@contextlib.contextmanager
def exporting_to(exporter: SpanExporter) -> Iterator[None]:
    """Servers whose tracing starts inside the block export to `exporter`, tracing on even
    without an OTLP endpoint."""
    global _exporter_override
    previous, _exporter_override = _exporter_override, exporter
    try:
        yield
    finally:
        _exporter_override = previous


def start(otlp_endpoint: str) -> TracerProvider | None:
    """A provider exporting to `otlp_endpoint` (e.g. http://collector:4317), or None when
    tracing is off. The exporter reads the other OTEL_EXPORTER_OTLP_* variables (headers,
    certificates, timeout) and the provider OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES."""
    exporter = _exporter_override
    if exporter is None:
        if not otlp_endpoint:
            return None
        exporter = OTLPSpanExporter(endpoint=otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE_NAME_VALUE}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def server_interceptors(
    provider: TracerProvider | None,
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    if provider is None:
        return []
    # The instrumentation package ships without type hints for its factories.
    interceptor: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=filters.service_prefix(TRACED_SERVICE_PREFIX)
    )
    return [interceptor]


def stop(provider: TracerProvider | None) -> None:
    """Sends what is queued (bounded by SHUTDOWN_FLUSH_TIMEOUT_MS) and stops exporting.
    Blocking: call it from a thread, not the event loop."""
    if provider is None:
        return
    provider.force_flush(SHUTDOWN_FLUSH_TIMEOUT_MS)
    provider.shutdown()
