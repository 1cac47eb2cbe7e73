"""The OIP gRPC frontend on loopback, driven by the real tritonclient over tiny ONNX models."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ensemble.config import ProfileConfig
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.frontends.grpc import start_grpc_server
from ensemble.frontends.grpc_h2 import start_h2_grpc_server
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.engine import InProcessEngine, SessionRunner
from ensemble.replicas.inprocess import InProcessReplica
from ensemble.replicas.member import Member, infer_classifier_schema
from ensemble.replicas.onnx import load_session, read_signature
from ensemble.repository import EnsembleModel, Profile, Repository
from ensemble.types import ModelMetadata, TensorSpec

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 64 * 1024
WEIGHTS_A = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float32)
WEIGHTS_B = np.array([[0, 2, 0], [1, 0, 0], [0, 0, 1], [0, 1, 2]], dtype=np.float32)


# -- models and server -----------------------------------------------------------------------


def classifier_onnx(path: Path, weights: np.ndarray, inputs: tuple[str, ...] = ("input",)) -> Path:
    """MatMul + Softmax + ArgMax over the sum of ``inputs`` (each FP32 [batch, 4])."""
    nodes = []
    summed = inputs[0]
    for extra in inputs[1:]:
        nodes.append(helper.make_node("Add", [summed, extra], [f"sum_{extra}"]))
        summed = f"sum_{extra}"
    nodes += [
        helper.make_node("MatMul", [summed, "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in inputs],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_member(name: str, path: Path, engine: InProcessEngine) -> Member:
    session = load_session(path)
    signature = read_signature(path, session)
    schema = infer_classifier_schema(
        name, signature.outputs, probability_output=None, classes=None, logits=False, card=None
    )
    replica = InProcessReplica("edge/0", "edge", SessionRunner(session, signature), engine)
    return Member(name, signature.inputs, signature.outputs, schema, [replica])


def make_repository(directory: Path, engine: InProcessEngine) -> Repository:
    a = make_member("linear_a", classifier_onnx(directory / "a.onnx", WEIGHTS_A), engine)
    b = make_member("linear_b", classifier_onnx(directory / "b.onnx", WEIGHTS_B), engine)
    pair = make_member(
        "pair", classifier_onnx(directory / "pair.onnx", WEIGHTS_A, ("x", "y")), engine
    )
    iris = EnsembleModel(
        name="iris",
        members={"linear_a": a, "linear_b": b},
        profiles={"test": Profile.build("test", ProfileConfig())},
        profile="test",
        classes=(0, 1, 2),
        metadata=ModelMetadata(
            name="iris",
            versions=("1",),
            platform="ensemble",
            inputs=a.inputs,
            outputs=(
                TensorSpec("label", "INT64", (-1,)),
                TensorSpec("probabilities", "FP32", (-1, 3)),
            ),
        ),
    )
    return Repository([iris], [a, b, pair])


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dispatcher]:
    engine = InProcessEngine(2)
    repository = make_repository(tmp_path_factory.mktemp("models"), engine)
    yield Dispatcher(repository, GatewayMetrics())
    engine.shutdown()


STARTS = {"grpcio": start_grpc_server, "uvicorn": start_h2_grpc_server}
"""Both gRPC stacks; every test below runs against each."""


@pytest.fixture(scope="module", params=sorted(STARTS))
def url(dispatcher: Dispatcher, request: pytest.FixtureRequest) -> Iterator[str]:
    """The gateway's gRPC server on a free port, in an event loop on a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-server", daemon=True)
    thread.start()
    try:
        start = STARTS[request.param](
            dispatcher, "127.0.0.1", 0, max_message_bytes=MAX_MESSAGE_BYTES
        )
        server, port = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=30)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def stub(url: str) -> Iterator[Any]:
    """The bare generated stub, for messages tritonclient refuses to build."""
    with grpc.insecure_channel(url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(name: str, array: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput(name, list(array.shape), "FP32")
    return inp.set_data_from_numpy(array.astype(np.float32))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


X = np.array([[0.5, 1.0, -1.0, 0.0], [2.0, 0.0, 1.0, 0.25]], dtype=np.float32)


# -- health, metadata, config, index ---------------------------------------------------------


def test_health(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("linear_a", "1")


def test_server_metadata(client: triton.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "ensemble-gateway"
    assert meta.version
    assert "binary_tensor_data" in meta.extensions


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("iris", as_json=True)
    assert meta == {
        "name": "iris",
        "versions": ["1"],
        "platform": "ensemble",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": ["-1"]},
            {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "3"]},
        ],
    }
    assert client.get_model_metadata("pair").platform == "onnxruntime_onnx"


def test_model_config(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("linear_a").config
    assert (config.name, config.platform, config.max_batch_size) == (
        "linear_a",
        "onnxruntime_onnx",
        1024,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", triton.model_config_pb2.TYPE_FP32, [4])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("label", []),
        ("probabilities", [3]),
    ]


def test_repository_index(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m["state"] for m in index} == {
        "iris": "READY",
        "linear_a": "READY",
        "linear_b": "READY",
        "pair": "READY",
    }
    assert {m["version"] for m in index} == {"1"}


# -- inference -------------------------------------------------------------------------------


def test_infer_ensemble(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "iris",
        [fp32_input("input", X)],
        request_id="req-42",
        parameters={"tier": "any"},
        timeout=2_000_000,
    )
    expected = (softmax(X @ WEIGHTS_A) + softmax(X @ WEIGHTS_B)) / 2
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("iris", "1", "req-42")
    params = response.parameters
    assert params["members_asked"].string_param == "linear_a,linear_b"
    assert params["members_answered"].string_param == "linear_a@edge,linear_b@edge"
    assert params["completeness"].double_param == 1.0
    assert all(len(raw) > 0 for raw in response.raw_output_contents)


def test_infer_member_with_requested_output(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "linear_b",
        [fp32_input("input", X)],
        model_version="1",
        outputs=[triton.InferRequestedOutput("probabilities")],
    )
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(X @ WEIGHTS_B), rtol=1e-5)
    assert result.get_response().parameters["members_answered"].string_param == "linear_b@edge"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_answered(
    client: triton.InferenceServerClient, algorithm: str
) -> None:
    result = client.infer("iris", [fp32_input("input", X)], compression_algorithm=algorithm)
    expected = (softmax(X @ WEIGHTS_A) + softmax(X @ WEIGHTS_B)) / 2
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5)


def test_infer_two_inputs(client: triton.InferenceServerClient) -> None:
    result = client.infer("pair", [fp32_input("x", X), fp32_input("y", X)])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), softmax((2 * X) @ WEIGHTS_A), rtol=1e-5
    )


def test_infer_typed_contents(stub: Any) -> None:
    msg = service_pb2.ModelInferRequest(model_name="linear_a")
    msg.inputs.add(name="input", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        X.ravel().tolist()
    )
    response = stub.ModelInfer(msg)
    probs = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(probs, softmax(X @ WEIGHTS_A), rtol=1e-5)


def test_aio_client(url: str) -> None:
    async def scenario() -> None:
        async with triton_aio.InferenceServerClient(url) as aio_client:
            assert await aio_client.is_server_ready()
            result = await aio_client.infer("iris", [fp32_input("input", X[:1])])
            assert result.as_numpy("label").shape == (1,)

    asyncio.run(scenario())


# -- errors ----------------------------------------------------------------------------------


def bad_raw_length(client: triton.InferenceServerClient) -> Any:
    inp = fp32_input("input", X)
    inp.set_shape([3, 4])  # declares 48 bytes, carries 32
    return client.infer("iris", [inp])


ERRORS: dict[str, tuple[Callable[[triton.InferenceServerClient], Any], str, str]] = {
    "unknown model": (
        lambda c: c.infer("nope", [fp32_input("input", X)]),
        "NOT_FOUND",
        "unknown model 'nope'",
    ),
    "unknown version": (
        lambda c: c.infer("iris", [fp32_input("input", X)], model_version="2"),
        "NOT_FOUND",
        "has no version '2'",
    ),
    "ready of unknown model": (lambda c: c.is_model_ready("nope"), "NOT_FOUND", "'nope'"),
    "metadata of unknown model": (lambda c: c.get_model_metadata("nope"), "NOT_FOUND", "'nope'"),
    "config of unknown version": (
        lambda c: c.get_model_config("iris", "7"),
        "NOT_FOUND",
        "no version '7'",
    ),
    "missing input": (
        lambda c: c.infer("pair", [fp32_input("x", X)]),
        "INVALID_ARGUMENT",
        "missing input(s) 'y'",
    ),
    "extra input": (
        lambda c: c.infer("iris", [fp32_input("input", X), fp32_input("extra", X)]),
        "INVALID_ARGUMENT",
        "unknown input 'extra'",
    ),
    "unknown input": (
        lambda c: c.infer("iris", [fp32_input("inputs", X)]),
        "INVALID_ARGUMENT",
        "unknown input 'inputs' for model 'iris'; it expects 'input'",
    ),
    "duplicate input": (
        lambda c: c.infer("iris", [fp32_input("input", X), fp32_input("input", X)]),
        "INVALID_ARGUMENT",
        "given more than once",
    ),
    "wrong shape": (
        lambda c: c.infer("iris", [fp32_input("input", np.zeros((2, 5)))]),
        "INVALID_ARGUMENT",
        "shape [2, 5] does not match the model's [-1, 4]",
    ),
    "wrong datatype": (
        lambda c: c.infer(
            "iris",
            [triton.InferInput("input", [2, 4], "FP64").set_data_from_numpy(X.astype(np.float64))],
        ),
        "INVALID_ARGUMENT",
        "datatype FP64 does not match the model's FP32",
    ),
    "raw length not matching shape": (
        bad_raw_length,
        "INVALID_ARGUMENT",
        "input 'input': shape [3, 4] of FP32 needs 48 bytes, raw_input_contents[0] has 32",
    ),
    "unknown output": (
        lambda c: c.infer(
            "iris", [fp32_input("input", X)], outputs=[triton.InferRequestedOutput("logits")]
        ),
        "INVALID_ARGUMENT",
        "unknown output 'logits'",
    ),
    "message over the size limit": (
        lambda c: c.infer("iris", [fp32_input("input", np.zeros((5000, 4)))]),
        "RESOURCE_EXHAUSTED",
        "",
    ),
    "unimplemented rpc": (lambda c: c.get_inference_statistics("iris"), "UNIMPLEMENTED", ""),
}


@pytest.mark.parametrize(("call", "code", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_have_their_status_and_message(
    client: triton.InferenceServerClient,
    call: Callable[[triton.InferenceServerClient], Any],
    code: str,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == f"StatusCode.{code}"
    assert message in (info.value.message() or "")


def raw_message(**fields: Any) -> Any:
    msg = service_pb2.ModelInferRequest(model_name="iris")
    msg.inputs.add(name="input", datatype=fields.pop("datatype", "FP32"), shape=[2, 4])
    msg.raw_input_contents.extend(fields.pop("raw", [X.tobytes()]))
    return msg


def _mixed() -> Any:
    msg = raw_message()
    msg.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())
    return msg


STUB_ERRORS = {
    "unknown datatype": (raw_message(datatype="FLOAT"), "unknown datatype 'FLOAT'"),
    "raw count above inputs": (
        raw_message(raw=[X.tobytes(), X.tobytes()]),
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    "raw mixed with typed": (_mixed(), "use one or the other"),
}


@pytest.mark.parametrize(("msg", "message"), STUB_ERRORS.values(), ids=STUB_ERRORS.keys())
def test_malformed_messages_are_invalid_argument(stub: Any, msg: Any, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(msg)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_server_still_serves_after_errors(client: triton.InferenceServerClient) -> None:
    for call, _, _ in ERRORS.values():
        with pytest.raises(InferenceServerException):
            call(client)
    assert client.is_server_ready()
    result = client.infer("iris", [fp32_input("input", X)])
    assert result.as_numpy("probabilities").shape == (2, 3)


# -- unexpected failures and binding ---------------------------------------------------------


class ExplodingDispatcher(Dispatcher):
    async def infer(self, request: Any, protocol: str) -> Any:
        raise RuntimeError("secret detail /etc/gateway")


@pytest.mark.parametrize("stack", sorted(STARTS))
def test_unexpected_error_is_internal_and_logged(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture, stack: str
) -> None:
    exploding = ExplodingDispatcher(dispatcher.repository, GatewayMetrics())

    async def scenario() -> None:
        server, port = await STARTS[stack](
            exploding, "127.0.0.1", 0, max_message_bytes=MAX_MESSAGE_BYTES
        )
        try:
            async with triton_aio.InferenceServerClient(f"127.0.0.1:{port}") as aio_client:
                with pytest.raises(InferenceServerException) as info:
                    await aio_client.infer("iris", [fp32_input("input", X)])
                assert info.value.status() == "StatusCode.INTERNAL"
                assert "secret" not in (info.value.message() or "")
                assert await aio_client.is_server_live()
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR, logger="ensemble.frontends.grpc"):
        asyncio.run(scenario())
    (record,) = [r for r in caplog.records if r.name == "ensemble.frontends.grpc"]
    assert "ModelInfer" in record.getMessage()
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


@pytest.mark.parametrize("stack", sorted(STARTS))
def test_busy_port_is_an_error(dispatcher: Dispatcher, url: str, stack: str) -> None:
    port = int(url.rsplit(":", 1)[1])

    async def scenario() -> None:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await STARTS[stack](dispatcher, "127.0.0.1", port, max_message_bytes=1024)

    asyncio.run(scenario())
