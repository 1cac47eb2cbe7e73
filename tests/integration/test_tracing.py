"""OpenTelemetry traces through a real gateway (in this process, on loopback ports, with the
SDK's in-memory exporter): a request's span continues the client's `traceparent`; each member
call attempt is a child span with its tier, replica, attempt and link; a hedged, a retried and a
partitioned request say so; the trace context reaches a remote replica over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ensemble import tracing
from ensemble.config import ServerConfig, parse_config
from ensemble.control.build import single_model
from ensemble.server import Gateway
from tests.integration.conftest import good_input
from tests.integration.process import ZOO, start_replica, zoo_member

pytestmark = pytest.mark.integration
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(None, provider=provider)
    yield exporter
    tracing.configure(None)


def config(replica_http: str, replica_grpc: str) -> Any:
    late = {"probability": 0.5, "delay_ms": 200}
    return parse_config(
        {
            "model_zoo": {"dir": str(ZOO)},
            "tiers": {
                "edge": {},
                "cloud": {"link": {"emulate": True, "delay_ms": 1, "jitter_ms": 0}},
            },
            "ensembles": [
                {
                    "name": "digits",
                    "members": [
                        zoo_member(
                            "forest",
                            {"tier": "edge", "replicas": {"min": 2, "max": 2}, "straggler": late},
                        ),
                        zoo_member(
                            "logreg",
                            {"tier": "edge", "failures": {"probability": 1}},
                            {"tier": "edge"},
                        ),
                        {
                            "name": "far",
                            "model": str(ZOO / "mlp_small.onnx"),
                            "placement": [{"tier": "cloud"}],
                        },
                        {
                            "name": "remote",
                            "model": str(ZOO / "mlp_small.onnx"),
                            "placement": [
                                {
                                    "tier": "edge",
                                    "backend": "oip-http",
                                    "endpoints": [replica_http],
                                    "remote_model": "mlp_small",
                                },
                                {
                                    "tier": "edge",
                                    "backend": "oip-grpc",
                                    "endpoints": [replica_grpc],
                                    "remote_model": "mlp_small",
                                },
                            ],
                        },
                    ],
                }
            ],
            "policies": {
                "default": {
                    "hedging": {
                        "name": "percentile",
                        "params": {
                            "budget": 1.0,
                            "burst": 100,
                            "min_delay_ms": 5,
                            "max_delay_ms": 20,
                        },
                    },
                },
            },
        }
    )


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Gateway, str, str]]:
    """A replica server (`ensemble replica`'s) and a gateway calling it, both on loopback."""
    server = ServerConfig(host="127.0.0.1", http_port=0, grpc_port=0)
    replica = Gateway(
        server, lambda engine: single_model(ZOO / "mlp_small.onnx", "mlp_small", engine)
    )
    far = await replica.start("127.0.0.1", 0, 0)
    gateway = Gateway.from_config(config(far.http_url, far.grpc_target))
    near = await gateway.start("127.0.0.1", 0, 0)
    try:
        yield gateway, near.http_url, near.grpc_target
    finally:
        await gateway.stop()
        await replica.stop()


def by_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_a_request_continues_the_clients_trace(spans: InMemorySpanExporter) -> None:
    asyncio.run(_continues(spans))


async def _continues(spans: InMemorySpanExporter) -> None:
    async with serving() as (_, url, _), httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(4):  # round robin: both of `remote`'s replicas (HTTP, gRPC) are asked
            reply = await client.post(
                "/v2/models/digits/infer",
                json={"inputs": [good_input()]},
                headers={"traceparent": TRACEPARENT},
            )
            assert reply.status_code == 200, reply.text
    trace = by_trace(spans, int(TRACE_ID, 16))
    parent = int(PARENT_ID, 16)
    requests = [s for s in trace if s.parent is not None and s.parent.span_id == parent]
    assert len(requests) == 4
    request = requests[-1]
    assert request.name == "POST /v2/models/{model}/infer" and request.kind == SpanKind.SERVER
    attributes = dict(request.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.scheme"] == "http"
    assert attributes["http.response.status_code"] == 200
    assert attributes["ensemble.model"] == "digits"
    assert attributes["ensemble.members_answered"] == reply.json()["parameters"]["members_answered"]
    calls = children(trace, request)
    assert {c.attributes["ensemble.member"] for c in calls} == {"forest", "logreg", "far", "remote"}
    for call in calls:  # only a call that leaves the process is a client's
        remote = call.attributes["ensemble.member"] == "remote"
        assert call.kind == (SpanKind.CLIENT if remote else SpanKind.INTERNAL)
        assert call.name == f"call {call.attributes['ensemble.member']}"
        assert {"ensemble.tier", "ensemble.replica", "ensemble.attempt"} <= set(call.attributes)
    [far] = [c for c in calls if c.attributes["ensemble.member"] == "far"]
    assert far.attributes["ensemble.link.delay_seconds"] == 0.001
    assert far.attributes["ensemble.link.partitioned"] is False
    # The remote replica's own server span continues the call's span: the context crossed,
    # as an HTTP header and as gRPC metadata.
    remote = [
        c
        for r in requests
        for c in children(trace, r)
        if c.attributes["ensemble.member"] == "remote"
    ]
    # The server each remote attempt went to, as OpenTelemetry names it: over HTTP and gRPC.
    assert {c.attributes.get("url.scheme") or c.attributes["rpc.system"] for c in remote} == {
        "http",
        "grpc",
    }
    for call in remote:
        assert call.attributes["server.address"] == "127.0.0.1"
        assert isinstance(call.attributes["server.port"], int)
    for call in remote:
        [served] = children(trace, call)
        assert served.kind == SpanKind.SERVER


def test_hedged_retried_and_partitioned_requests_say_so(spans: InMemorySpanExporter) -> None:
    asyncio.run(_say_so(spans))


async def _say_so(spans: InMemorySpanExporter) -> None:
    async with serving() as (gateway, url, grpc_target):
        await _hedged_and_retried(url, spans)
        await _partitioned(gateway, url, spans)
        await _over_grpc(grpc_target, spans)
        await _over_a_grpc_stream(grpc_target, spans)


async def _hedged_and_retried(url: str, spans: InMemorySpanExporter) -> None:
    hedged = retried = None
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(120):  # bounded: half of forest's calls straggle, logreg's first fails
            reply = await client.post("/v2/models/digits/infer", json={"inputs": [good_input()]})
            params = reply.json()["parameters"]
            if params.get("hedges") and hedged is None:
                hedged = reply.headers
            if params.get("retries") and retried is None:
                retried = reply.headers
            if hedged is not None and retried is not None:
                break
        assert hedged is not None and retried is not None
        finished = spans.get_finished_spans()
        attempts = [s for s in finished if "ensemble.attempt" in (s.attributes or {})]
        hedges = [s for s in attempts if s.attributes["ensemble.attempt.kind"] == "hedge"]
        assert hedges and all(s.attributes["ensemble.member"] == "forest" for s in hedges)
        assert any(s.attributes.get("ensemble.cancelled") for s in attempts)  # a loser
        retries = [s for s in attempts if s.attributes["ensemble.attempt.kind"] == "retry"]
        assert retries and all(s.attributes["ensemble.attempt"] == 2 for s in retries)
        failed = [s for s in attempts if s.status.status_code == StatusCode.ERROR]
        assert failed and all(s.attributes["ensemble.member"] == "logreg" for s in failed)
        assert all(s.attributes["error.type"] for s in failed)


async def _partitioned(gateway: Gateway, url: str, spans: InMemorySpanExporter) -> None:
    """A partitioned tier: its member is not asked; the request's span says who was not."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert gateway.links is not None
        gateway.links.get("cloud").change({"partitioned": True})  # type: ignore[union-attr]
        spans.clear()
        reply = await client.post("/v2/models/digits/infer", json={"inputs": [good_input()]})
        assert reply.status_code == 200 and reply.json()["parameters"]["degraded"] is True
        finished = spans.get_finished_spans()
        [request] = [s for s in finished if s.kind == SpanKind.SERVER and s.parent is None]
        assert request.attributes["ensemble.unreachable"] == "far"
        assert request.attributes["ensemble.degraded"] is True


async def _over_grpc(grpc_target: str, spans: InMemorySpanExporter) -> None:
    """Over gRPC: the same span, with gRPC's attributes, continuing the client's metadata."""
    spans.clear()
    client = grpcaio.InferenceServerClient(grpc_target)
    try:
        tensor = grpcaio.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        await client.infer("logreg", [tensor], headers={"traceparent": TRACEPARENT})
    finally:
        await client.close()
    [request] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.name == "inference.GRPCInferenceService/ModelInfer"
    assert request.context.trace_id == int(TRACE_ID, 16)
    assert request.attributes["rpc.system"] == "grpc"
    assert request.attributes["rpc.grpc.status_code"] == 0


async def _over_a_grpc_stream(grpc_target: str, spans: InMemorySpanExporter) -> None:
    """Each request of a ModelStreamInfer stream: a span of its own, named after the stream's
    RPC, continuing the stream's metadata."""
    spans.clear()
    client = grpcaio.InferenceServerClient(grpc_target)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(2):
            tensor = grpcaio.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
            yield {"model_name": "logreg", "inputs": [tensor], "request_id": str(i)}

    try:
        answers = client.stream_infer(requests(), headers={"traceparent": TRACEPARENT})
        got = [await anext(answers) for _ in range(2)]
        answers.cancel()
    finally:
        await client.close()
    assert [error for _, error in got] == [None, None]
    served = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in served] == ["inference.GRPCInferenceService/ModelStreamInfer"] * 2
    assert {s.context.trace_id for s in served} == {int(TRACE_ID, 16)}
    assert all(s.attributes["rpc.method"] == "ModelStreamInfer" for s in served)


def test_grpc_spans_on_the_uvicorn_stack(spans: InMemorySpanExporter) -> None:
    """The uvicorn gRPC stack hands the same metadata to the same handlers: same span."""

    async def scenario() -> None:
        server = ServerConfig(host="127.0.0.1", http_port=0, grpc_port=0, grpc_stack="uvicorn")
        gateway = Gateway(
            server, lambda engine: single_model(ZOO / "logreg.onnx", "logreg", engine)
        )
        where = await gateway.start("127.0.0.1", 0, 0)
        try:
            await _over_grpc(where.grpc_target, spans)
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_tracing_is_off_by_default() -> None:
    assert ServerConfig().tracing.enabled is False
    assert not tracing.enabled()
    call = asyncio.sleep(0)
    assert tracing.attempt(call, "x", {}, remote=False) is call  # no wrapper, no cost
    call.close()


@pytest.mark.slow
def test_a_replica_server_traces_when_asked(tmp_path: Path) -> None:
    replica = start_replica(ZOO / "logreg.onnx", tmp_path / "replica.log", "--trace", "console")
    try:
        reply = httpx.post(
            f"{replica.http_url}/v2/models/logreg/infer",
            json={"inputs": [good_input()]},
            headers={"traceparent": TRACEPARENT},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
    finally:
        assert replica.stop() == 0, replica.log()  # its exporter flushes on the way out
    log = replica.log()
    assert f'"trace_id": "0x{TRACE_ID}"' in log, log
    assert '"name": "POST /v2/models/{model}/infer"' in log
    assert f'"parent_id": "0x{PARENT_ID}"' in log


def test_a_replicas_endpoint_names_its_server_as_opentelemetry_does() -> None:
    assert tracing.peer_attributes("http://127.0.0.1:8001/base") == {
        "network.protocol.name": "http",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": 8001,
    }
    assert tracing.peer_attributes("[::1]:8002") == {
        "rpc.system": "grpc",
        "server.address": "::1",
        "server.port": 8002,
    }
    assert tracing.peer_attributes("edge-7") == {"rpc.system": "grpc", "server.address": "edge-7"}
