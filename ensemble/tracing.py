"""Traces with OpenTelemetry, off unless configured (`server.tracing`): a SERVER span per
inference request, its parent the client's W3C `traceparent` (HTTP header or gRPC metadata); a
CLIENT span per member call attempt (member, version, tier, replica, attempt number and kind,
emulated link), its context sent on to remote replicas as `traceparent`.

The tracer is the process's (one gateway per process); while tracing is off every function
here costs one comparison, and OpenTelemetry is never imported. Attribute names follow
OpenTelemetry's semantic conventions where they have one (`http.*`, `url.*`, `rpc.*`,
`server.address`, `error.type`) and are ``ensemble.*`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ensemble import __version__
from ensemble.config import TracingConfig
from ensemble.errors import EnsembleError

T = TypeVar("T")
Attributes = Mapping[str, str | bool | int | float]

_tracer: Any = None
"""The OpenTelemetry tracer while tracing is on, else None."""
_provider: Any = None
_propagator: Any = None


def configure(config: TracingConfig | None, *, provider: Any = None) -> None:
    """Trace this process's requests: as ``config`` says, or into ``provider`` (an SDK
    TracerProvider a test made, with its in-memory exporter). EnsembleError when tracing is
    asked for and OpenTelemetry (the `tracing` extra) is missing."""
    global _tracer, _provider, _propagator
    if provider is None and (config is None or not config.enabled):
        _tracer = _provider = None
        return
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise EnsembleError(
            "server.tracing needs OpenTelemetry: pip install 'ensemble-gateway[tracing]'"
        ) from None
    if provider is None:
        assert config is not None
        provider = _sdk_provider(config)
    _provider = provider
    _tracer = provider.get_tracer("ensemble.gateway", __version__)
    _propagator = TraceContextTextMapPropagator()


def _sdk_provider(config: TracingConfig) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if config.exporter == "console":  # stderr: stdout carries the ready line
        exporter: Any = ConsoleSpanExporter(out=sys.stderr)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise EnsembleError(
                "server.tracing.exporter otlp needs opentelemetry-exporter-otlp-proto-http "
                "(pip install 'ensemble-gateway[tracing]')"
            ) from None
        exporter = OTLPSpanExporter(endpoint=config.endpoint)
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shutdown() -> None:
    """Send the spans not exported yet and stop (the gateway is stopping)."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def request_span(name: str, carrier: Mapping[str, str], attributes: Attributes) -> Iterator[Any]:
    """A SERVER span for one request, current inside; its parent from ``carrier``'s
    `traceparent`. Yields None while tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    parent = _propagator.extract(carrier)
    with _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        yield span


def failed(span: Any, error: BaseException, *, server_fault: bool) -> None:
    """Mark ``span`` as ended by ``error`` (an error status only for the server's own faults,
    as the conventions have it for server spans)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    kind = error.reason if isinstance(error, EnsembleError) else type(error).__name__
    span.set_attribute("error.type", kind)
    if server_fault:
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))


def annotate(attributes: Attributes) -> None:
    """Add ``attributes`` to the current span (the request's), if one is recording."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(dict(attributes))


def attempt(call: Awaitable[T], name: str, attributes: Attributes, *, remote: bool) -> Awaitable[T]:
    """``call`` (one attempt of a member call) inside a span: CLIENT when it leaves the
    process (``remote``), else INTERNAL; unchanged while tracing is off."""
    if _tracer is None:
        return call
    return _attempt(call, name, attributes, remote)


async def _attempt(call: Awaitable[T], name: str, attributes: Attributes, remote: bool) -> T:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    kind = SpanKind.CLIENT if remote else SpanKind.INTERNAL
    with _tracer.start_as_current_span(
        name, kind=kind, attributes=attributes, record_exception=False,
        set_status_on_exception=False,
    ) as span:  # fmt: skip
        try:
            return await call
        except asyncio.CancelledError:
            span.set_attribute("ensemble.cancelled", True)  # a hedge's loser, a late call
            raise
        except Exception as exc:
            span.record_exception(exc)
            error = exc.reason if isinstance(exc, EnsembleError) else type(exc).__name__
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to an outgoing call's headers."""
    if _tracer is not None:
        _propagator.inject(headers)


def peer_attributes(endpoint: str) -> dict[str, str | int]:
    """OpenTelemetry's attributes for the server a remote replica's endpoint names: an HTTP
    base URL (``http://host:port/...``) or a gRPC target (``host:port``)."""
    url = urlsplit(endpoint)
    if url.scheme in ("http", "https"):
        found: dict[str, str | int] = {"network.protocol.name": "http", "url.scheme": url.scheme}
        host, port = url.hostname, url.port
    else:
        found = {"rpc.system": "grpc"}
        host, _, text = endpoint.rpartition(":")
        port = int(text) if text.isdigit() else None
        host = host.strip("[]") or endpoint
    if host:
        found["server.address"] = host
    if port is not None:
        found["server.port"] = port
    return found
