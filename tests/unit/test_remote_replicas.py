"""Remote backends with fake servers (no sockets): the OIP codecs both ways, remote failures
mapped to the gateway's errors, timeouts, cancellation, active health checks, and failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from tritonclient.utils import InferenceServerException

from ensemble.clock import SYSTEM_CLOCK
from ensemble.dataplane.calls import ResilientCall
from ensemble.errors import InvalidInput, MemberFailed
from ensemble.oip import grpc as grpc_codec
from ensemble.oip import rest as rest_codec
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.replicas.oip_grpc import GrpcReplica
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.remote import HealthCheck, RemoteReplica
from ensemble.scope import outgoing, request_scope
from ensemble.types import (
    DEFAULT_PRIORITY,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    TensorSpec,
)
from policies.outlier_detection import CircuitBreaker, CircuitBreakerParams

OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2)))
FEED = {"input": np.array([[0.25, 0.75]], np.float32)}
FAST = HealthCheck(interval_s=0.01, timeout_s=0.5, unhealthy_threshold=2)


def answer(request: InferRequest) -> InferResponse:
    """What a server for OUTPUTS answers: probabilities = the input, label = its argmax."""
    x = request.inputs[0].data
    probs = np.asarray(x, np.float32)
    tensors = [
        Tensor("label", "INT64", (len(x),), probs.argmax(axis=1).astype(np.int64)),
        Tensor("probabilities", "FP32", probs.shape, probs),
    ]
    wanted = [o.name for o in request.outputs or ()] or [t.name for t in tensors]
    return InferResponse(request.model_name, "1", [t for t in tensors if t.name in wanted])


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def oip_server(seen: list[httpx.Request] | None = None, ready: list[int] | None = None) -> Handler:
    """A fake OIP REST server built from the gateway's own server-side codec."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path.endswith("/ready"):
            status = ready[0] if ready else 200
            return httpx.Response(status, json={"ready": status == 200})
        body = request.content
        parsed = rest_codec.decode_infer_request(
            body, request.headers.get("inference-header-content-length"), "m", None
        )
        payload, length = rest_codec.encode_infer_response(answer(parsed), parsed)
        headers = {} if length is None else {"inference-header-content-length": str(length)}
        return httpx.Response(200, content=payload, headers=headers)

    return handle


def http_replica(handler: Handler, **kw: Any) -> HttpReplica:
    kw.setdefault("health", FAST)
    replica = HttpReplica("edge/0", "edge", "http://replica.test:9000", "m", OUTPUTS, **kw)
    replica.transport = httpx.MockTransport(handler)
    return replica


async def started(replica: RemoteReplica) -> RemoteReplica:
    await replica.start()
    return replica


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- the REST codec, client side ---------------------------------------------------------------


def test_request_body_is_binary_and_the_server_decodes_it() -> None:
    feed = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([[1], [2]], np.int64),
        "s": np.array([b"x", "\u00e9".encode()], dtype=np.object_),
    }
    body, length = rest_codec.encode_request_body(feed, ["p"])
    header = orjson.loads(body[:length])
    assert all("data" not in t for t in header["inputs"])
    assert header["outputs"] == [{"name": "p", "parameters": {"binary_data": True}}]
    decoded = rest_codec.decode_infer_request(body, str(length), "m", None)
    assert [(t.name, t.datatype, t.shape) for t in decoded.inputs] == [
        ("a", "FP32", (2, 3)),
        ("b", "INT64", (2, 1)),
        ("s", "BYTES", (2,)),
    ]
    for t in decoded.inputs:
        assert np.array_equal(t.data, feed[t.name])
    assert decoded.outputs == [RequestedOutput("p", True)]


@pytest.mark.parametrize("binary", [True, False])
def test_response_body_decodes_binary_and_json_outputs(binary: bool) -> None:
    request = InferRequest("m", None, [], parameters={"binary_data_output": binary})
    response = InferResponse(
        "m",
        "1",
        [
            Tensor("p", "FP32", (1, 2), np.array([[0.5, 0.5]], np.float32)),
            Tensor("l", "BYTES", (1,), np.array([b"cat"], np.object_)),
        ],
    )
    payload, length = rest_codec.encode_infer_response(response, request)
    outputs = rest_codec.decode_response_body(payload, None if length is None else str(length))
    assert outputs["p"].dtype == np.float32 and outputs["p"].tolist() == [[0.5, 0.5]]
    assert outputs["l"].tolist() == [b"cat"]


@pytest.mark.parametrize(
    ("body", "length", "match"),
    [
        (b"not json", None, "malformed JSON in response"),
        (b'{"model_name": "m"}', None, "list of 'outputs'"),
        (
            b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2], '
            b'"parameters": {"binary_data_size": 8}}]}' + b"\0" * 4,
            "9999",
            "outside the body",
        ),
        (
            b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            "needs 2 elements",
        ),
    ],
)
def test_malformed_response_bodies_are_named(body: bytes, length: str | None, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        rest_codec.decode_response_body(body, length)


def test_error_message_reads_oip_error_bodies() -> None:
    assert rest_codec.error_message(b'{"error": "bad shape"}') == "bad shape"
    assert rest_codec.error_message(b"<html>oops</html>") == "<html>oops</html>"
    assert rest_codec.error_message(b"") == "(empty body)"


# -- oip-http ----------------------------------------------------------------------------------


def test_http_replica_answers_through_the_binary_extension() -> None:
    seen: list[httpx.Request] = []

    async def main() -> dict[str, np.ndarray]:
        replica = await started(http_replica(oip_server(seen)))
        try:
            assert replica.ready()
            return await replica.infer(FEED, ["probabilities"])
        finally:
            await replica.close()

    outputs = asyncio.run(main())
    assert list(outputs) == ["probabilities"]
    assert outputs["probabilities"].tolist() == [[0.25, 0.75]]
    infer = next(r for r in seen if r.url.path.endswith("/infer"))
    assert str(infer.url) == "http://replica.test:9000/v2/models/m/infer"
    assert infer.headers["content-type"] == "application/octet-stream"
    assert int(infer.headers["inference-header-content-length"]) < len(infer.content)


def test_http_replica_asks_for_every_local_output_by_default() -> None:
    async def main() -> dict[str, np.ndarray]:
        replica = await started(http_replica(oip_server()))
        try:
            return await replica.infer(FEED)
        finally:
            await replica.close()

    outputs = asyncio.run(main())
    assert outputs["label"].tolist() == [1] and outputs["label"].dtype == np.int64


def failing(status: int, body: bytes = b'{"error": "boom"}') -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        return httpx.Response(status, content=body)

    return handle


def refusing() -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    return handle


def malformed() -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        return httpx.Response(200, content=b'{"outputs": "nope"}')

    return handle


def wrong_datatype() -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        out = {"name": "probabilities", "datatype": "FP64", "shape": [1, 2], "data": [0.5, 0.5]}
        return httpx.Response(200, json={"outputs": [out]})

    return handle


def call(handler: Handler, **kw: Any) -> BaseException | None:
    async def main() -> BaseException | None:
        replica = await started(http_replica(handler, **kw))
        try:
            await replica.infer(FEED, ["probabilities"])
        except Exception as exc:
            return exc
        finally:
            await replica.close()
        return None

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("handler", "kind", "words"),
    [
        (
            failing(400, b'{"error": "bad shape"}'),
            InvalidInput,
            "rejected the input (400): bad shape",
        ),
        (failing(413), InvalidInput, "(413)"),
        (failing(404), MemberFailed, "answered 404: boom"),
        (failing(429), MemberFailed, "answered 429"),
        (failing(500, b"Internal Server Error"), MemberFailed, "Internal Server Error"),
        (failing(503), MemberFailed, "answered 503"),
        (refusing(), MemberFailed, "ConnectError: [Errno 111] Connection refused"),
        (malformed(), MemberFailed, "malformed response"),
        (wrong_datatype(), MemberFailed, "as FP64, the local model says FP32"),
    ],
)
def test_http_failures_map_to_the_error_tree(
    handler: Handler, kind: type[Exception], words: str
) -> None:
    error = call(handler)
    assert type(error) is kind, error
    assert words in str(error)
    assert "edge/0" in str(error) and "http://replica.test:9000" in str(error)


def test_a_call_slower_than_its_timeout_fails() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/ready"):
            await asyncio.sleep(5)
        return httpx.Response(200)

    start = time.perf_counter()
    error = call(slow, timeout_s=0.05)
    assert isinstance(error, MemberFailed) and "did not answer within 0.05 s" in str(error)
    assert time.perf_counter() - start < 2


def test_a_missing_output_is_the_replicas_failure() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        return httpx.Response(200, json={"outputs": []})

    error = call(handle)
    assert isinstance(error, MemberFailed) and "without output 'probabilities'" in str(error)


def test_cancelling_a_call_cancels_its_request_and_leaves_no_task() -> None:
    cancelled = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200)

    async def main() -> None:
        replica = await started(http_replica(hang, health=HealthCheck(interval_s=60)))
        before = asyncio.all_tasks()
        task = asyncio.ensure_future(replica.infer(FEED, ["probabilities"]))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(cancelled.wait(), 1)
        assert asyncio.all_tasks() <= before  # nothing left behind
        await replica.close()

    asyncio.run(main())


def test_calls_before_start_or_after_close_fail_cleanly() -> None:
    async def main() -> None:
        replica = http_replica(oip_server())
        assert not replica.ready()
        with pytest.raises(MemberFailed, match="not started"):
            await replica.infer(FEED)
        await replica.start()
        await replica.close()
        assert not replica.ready()
        with pytest.raises(MemberFailed, match="already closed"):
            await replica.infer(FEED)

    asyncio.run(main())


# -- active health checks ----------------------------------------------------------------------


def test_health_checks_follow_the_server_down_and_back_up() -> None:
    ready = [200]

    async def main() -> None:
        replica = await started(http_replica(oip_server(ready=ready)))
        assert replica.ready()
        ready[0] = 503  # draining, or the model unloaded
        await eventually(lambda: not replica.ready())
        assert "model ready answered 503" in str(replica.last_check_error)
        ready[0] = 200
        await eventually(replica.ready)
        assert replica.last_check_error is None
        await replica.close()

    asyncio.run(main())


def test_a_server_down_at_start_is_not_ready_after_start() -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async def main() -> None:
        replica = await started(http_replica(down, health=HealthCheck(interval_s=60)))
        assert not replica.ready() and "ConnectError" in str(replica.last_check_error)
        await replica.close()

    asyncio.run(main())


def test_unhealthy_threshold_needs_consecutive_failures() -> None:
    replica = http_replica(oip_server(), health=HealthCheck(unhealthy_threshold=3))

    for outcome in (None, "down", "down", None, "down", "down"):
        replica.record_check(outcome)
    assert replica.ready()  # never three failures in a row
    replica.record_check("down")
    assert not replica.ready()
    replica.record_check(None)
    assert replica.ready()  # one pass is enough to come back


def test_a_slow_health_check_fails() -> None:
    async def slow_ready(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    async def main() -> None:
        health = HealthCheck(interval_s=60, timeout_s=0.05)
        replica = await started(http_replica(slow_ready, health=health))
        assert not replica.ready() and "no answer within 0.05 s" in str(replica.last_check_error)
        await replica.close()

    asyncio.run(main())


def test_close_stops_the_health_checks() -> None:
    checks: list[httpx.Request] = []

    async def main() -> None:
        replica = await started(http_replica(oip_server(seen=checks)))
        await eventually(lambda: len(checks) >= 3)
        await replica.close()
        count = len(checks)
        await asyncio.sleep(0.05)
        assert len(checks) == count

    asyncio.run(main())


# -- failover across remote replicas -----------------------------------------------------------


def test_a_refused_replica_fails_over_and_an_input_error_does_not() -> None:
    async def main(first: Handler) -> tuple[ResilientCall, list[HttpReplica]]:
        dead = http_replica(first)
        alive = HttpReplica("cloud/0", "cloud", "http://b.test", "m", OUTPUTS)
        alive.transport = httpx.MockTransport(oip_server())
        replicas = [dead, alive]
        for r in replicas:
            await r.start()
        schema = ClassifierSchema("probabilities", (0, 1), False)
        member = Member("m", (TensorSpec("input", "FP32", (-1, 2)),), OUTPUTS, schema, replicas)
        resilient = ResilientCall(
            member,
            replicas,
            FEED,
            ("probabilities",),
            hedge_delay_s=None,
            may_hedge=lambda: False,
            may_retry=lambda: True,
            max_attempts=2,
            attempt_timeout=lambda left: None,
        )
        await asyncio.wait([resilient.future], timeout=5)
        for r in replicas:
            await r.close()
        return resilient, replicas

    resilient, _ = asyncio.run(main(refusing()))
    assert resilient.retries == 1 and resilient.replica.name == "cloud/0"
    assert resilient.future.result()["probabilities"].tolist() == [[0.25, 0.75]]
    assert resilient.member.stats["edge/0"].failures == 1

    resilient, _ = asyncio.run(main(failing(400)))
    assert resilient.retries == 0
    assert isinstance(resilient.future.exception(), InvalidInput)


# -- oip-grpc ----------------------------------------------------------------------------------


class FakeResult:
    def __init__(self, response: Any) -> None:
        self._response = response

    def get_response(self) -> Any:
        return self._response


class FakeGrpcClient:
    """tritonclient.grpc.aio.InferenceServerClient's shape; answers with the server codec."""

    def __init__(self, error: InferenceServerException | None = None) -> None:
        self.error = error
        self.ready = True
        self.closed = False
        self.requests: list[Any] = []
        self.options: list[dict[str, Any]] = []

    async def infer(
        self, model: str, inputs: list[Any], outputs: list[Any], **options: Any
    ) -> FakeResult:
        self.options.append(options)
        if self.error is not None:
            raise self.error
        from tritonclient.grpc import service_pb2

        msg = service_pb2.ModelInferRequest(model_name=model)
        for tensor in inputs:
            msg.inputs.append(tensor._get_tensor())
            msg.raw_input_contents.append(tensor._get_content())
        for out in outputs:
            msg.outputs.append(out._get_tensor())
        self.requests.append(msg)
        request = grpc_codec.decode_infer_request(msg)
        return FakeResult(grpc_codec.encode_infer_response(answer(request)))

    async def is_model_ready(self, model: str, client_timeout: float | None = None) -> bool:
        if self.error is not None:
            raise self.error
        return self.ready

    async def close(self) -> None:
        self.closed = True


def grpc_call(client: FakeGrpcClient) -> tuple[GrpcReplica, dict[str, np.ndarray] | Exception]:
    async def main() -> tuple[GrpcReplica, dict[str, np.ndarray] | Exception]:
        replica = GrpcReplica(
            "cloud/0",
            "cloud",
            "127.0.0.1:9001",
            "m",
            OUTPUTS,
            health=HealthCheck(interval_s=60),
        )
        replica.connect = lambda *_: client
        await replica.start()
        try:
            return replica, await replica.infer(FEED, ["probabilities", "label"])
        except Exception as exc:
            return replica, exc
        finally:
            await replica.close()

    return asyncio.run(main())


def test_grpc_replica_sends_raw_contents_and_decodes_raw_outputs() -> None:
    client = FakeGrpcClient()
    _, outputs = grpc_call(client)
    assert isinstance(outputs, dict)
    assert outputs["probabilities"].tolist() == [[0.25, 0.75]]
    assert outputs["label"].tolist() == [1]
    [msg] = client.requests
    assert msg.model_name == "m" and len(msg.raw_input_contents) == 1
    assert not msg.inputs[0].HasField("contents")
    assert client.closed


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidInput),
        ("StatusCode.UNAVAILABLE", MemberFailed),
        ("StatusCode.DEADLINE_EXCEEDED", MemberFailed),
        ("StatusCode.NOT_FOUND", MemberFailed),
        ("StatusCode.INTERNAL", MemberFailed),
        (None, MemberFailed),
    ],
)
def test_grpc_failures_map_to_the_error_tree(status: str | None, kind: type[Exception]) -> None:
    error = InferenceServerException("it went wrong", status=status)
    replica, outcome = grpc_call(FakeGrpcClient(error))
    assert type(outcome) is kind
    assert "it went wrong" in str(outcome) and "cloud/0" in str(outcome)
    assert not replica.ready()  # its health check raised the same error


def test_grpc_health_check_reads_model_ready() -> None:
    client = FakeGrpcClient()
    client.ready = False

    async def main() -> str | None:
        replica = GrpcReplica("cloud/0", "cloud", "h:1", "m", OUTPUTS, health=FAST)
        replica.connect = lambda *_: client
        await replica.start()
        assert not replica.ready()
        client.ready = True
        await eventually(replica.ready)
        await replica.close()
        return replica.last_check_error

    assert asyncio.run(main()) is None


def test_a_replica_whose_server_comes_back_is_taken_out_of_ejection() -> None:
    class Flaky:
        name, tier = "edge/0", "edge"
        up = True

        def ready(self) -> bool:
            return self.up

    replica, other = Flaky(), Flaky()
    other.name = "cloud/0"
    schema = ClassifierSchema("probabilities", (0, 1), False)
    member = Member("m", (), OUTPUTS, schema, [replica, other])  # type: ignore[list-item]
    member.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=1))
    member.observe(replica, member.attempt(replica), 0.01, "error")  # type: ignore[arg-type]
    assert member.replica_view(replica).ejected  # type: ignore[arg-type]
    replica.up = False  # its health checks fail: the server is down
    assert not member.replica_view(replica).ready  # type: ignore[arg-type]
    replica.up = True  # ... and pass again: it is back
    view = member.replica_view(replica)  # type: ignore[arg-type]
    assert view.ready and not view.ejected


# -- the request's deadline and priority travel ------------------------------------------------


def test_http_calls_send_the_time_left_and_the_priority() -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        replica = await started(http_replica(oip_server(seen)))
        try:
            await replica.infer(FEED)  # outside any request: nothing to send
            deadline = SYSTEM_CLOCK.now() + 0.25
            with request_scope(deadline, 3, SYSTEM_CLOCK):
                await replica.infer(FEED)
            with request_scope(None, DEFAULT_PRIORITY, SYSTEM_CLOCK):
                await replica.infer(FEED)  # no deadline, default priority: nothing either
        finally:
            await replica.close()

    asyncio.run(main())
    headers = [
        orjson.loads(r.content[: int(r.headers["inference-header-content-length"])])
        for r in seen
        if r.url.path.endswith("/infer")
    ]
    assert [h.get("parameters") for h in (headers[0], headers[2])] == [None, None]
    sent = headers[1]["parameters"]
    assert sent["priority"] == 3 and 200_000 < sent["timeout"] <= 250_000


def test_grpc_calls_send_the_time_left_the_priority_and_a_backstop_deadline() -> None:
    client = FakeGrpcClient()

    async def main() -> None:
        replica = GrpcReplica("cloud/0", "cloud", "127.0.0.1:9001", "m", OUTPUTS)
        replica.connect = lambda *_: client
        await replica.start()
        try:
            await replica.infer(FEED)
            with request_scope(SYSTEM_CLOCK.now() + 0.25, 3, SYSTEM_CLOCK):
                await replica.infer(FEED)
        finally:
            await replica.close()

    asyncio.run(main())
    plain, scoped = client.options
    assert plain == {"priority": 0, "timeout": None, "client_timeout": None}
    assert scoped["priority"] == 3 and 200_000 < scoped["timeout"] <= 250_000
    assert scoped["client_timeout"] == pytest.approx(scoped["timeout"] / 1e6 + 0.05)


def test_the_time_left_is_capped_by_the_replicas_own_timeout_and_never_zero() -> None:
    clock = SYSTEM_CLOCK
    with request_scope(clock.now() + 100.0, DEFAULT_PRIORITY, clock):
        assert outgoing(2.0) == (2_000_000, None)
    with request_scope(clock.now() - 1.0, 7, clock):
        assert outgoing(2.0) == (1, 7)  # already late: the server fails it at once
    assert outgoing(2.0) == (None, None)
