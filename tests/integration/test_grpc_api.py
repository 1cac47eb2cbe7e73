"""OIP gRPC through the real tritonclient.grpc client against the running gateway."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.integration.process import GatewayProcess

pytestmark = pytest.mark.integration
MEMBERS = ["mlp_small_int8", "logreg", "forest", "mlp_large", "svm"]


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(gateway.grpc_target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(gateway.grpc_target)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    x: np.ndarray,
    datatype: str = "FP32",
    name: str = "input",
) -> grpcclient.InferResult:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "ensemble-gateway"
    meta = client.get_model_metadata("digits")
    assert meta.platform == "ensemble" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [t.name for t in meta.outputs] == ["label", "probabilities"]
    for name in ["digits", *MEMBERS]:
        assert client.is_model_ready(name)


def test_accuracy_over_test_split(
    client: grpcclient.InferenceServerClient, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    labels = [
        int(infer(client, "digits", x[i : i + 1]).as_numpy("label")[0]) for i in range(len(x))
    ]
    ensemble_acc = float(np.mean(np.asarray(labels) == y))
    best = max(float(np.mean(infer(client, m, x).as_numpy("label") == y)) for m in MEMBERS)
    assert ensemble_acc >= best - 0.01, (ensemble_acc, best)


def test_response_parameters(client: grpcclient.InferenceServerClient) -> None:
    result = infer(client, "digits", np.zeros((2, 64), np.float32))
    params = result.get_response().parameters
    assert params["members_asked"].string_param.split(",") == MEMBERS
    assert params["completeness"].double_param == 1.0
    assert 0.0 < params["confidence"].double_param <= 1.0
    assert result.as_numpy("probabilities").shape == (2, 10)


@pytest.mark.parametrize(
    ("model", "x", "datatype", "name", "code", "fragment"),
    [
        ("nope", np.zeros((1, 64), np.float32), "FP32", "input", "NOT_FOUND", "unknown model"),
        (
            "digits",
            np.zeros((1, 64), np.float32),
            "FP32",
            "pixels",
            "INVALID_ARGUMENT",
            "unknown input 'pixels'",
        ),
        (
            "digits",
            np.zeros((1, 63), np.float32),
            "FP32",
            "input",
            "INVALID_ARGUMENT",
            "does not match",
        ),
        (
            "digits",
            np.zeros((1, 64), np.float64),
            "FP64",
            "input",
            "INVALID_ARGUMENT",
            "datatype FP64",
        ),
        (
            "digits",
            np.zeros((0, 64), np.float32),
            "FP32",
            "input",
            "INVALID_ARGUMENT",
            "batch dimension is 0",
        ),
    ],
)
def test_bad_requests(
    client: grpcclient.InferenceServerClient,
    model: str,
    x: np.ndarray,
    datatype: str,
    name: str,
    code: str,
    fragment: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, x, datatype, name)
    assert code in str(info.value.status()) and fragment in info.value.message()
    assert client.is_server_ready()


def raw_request(**over: object) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="digits")
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 64])
    req.raw_input_contents.append(np.zeros(64, "<f4").tobytes())
    for key, value in over.items():
        setattr(req, key, value)
    return req


def expect(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    req: service_pb2.ModelInferRequest,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=30)
    assert info.value.code() == code and fragment in info.value.details()


def test_raw_contents_errors(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ModelInfer(raw_request(), timeout=30).outputs[0].name == "label"
    short = raw_request()
    short.raw_input_contents[0] = b"\0" * 60
    expect(stub, short, grpc.StatusCode.INVALID_ARGUMENT, "input 'input'")
    extra = raw_request()
    extra.raw_input_contents.append(b"\0" * 4)
    expect(stub, extra, grpc.StatusCode.INVALID_ARGUMENT, "raw")
    missing = raw_request()
    del missing.inputs[:]
    del missing.raw_input_contents[:]
    expect(stub, missing, grpc.StatusCode.INVALID_ARGUMENT, "input")
    version = raw_request(model_version="9")
    expect(stub, version, grpc.StatusCode.NOT_FOUND, "no version '9'")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_over_size_limit(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    big = raw_request()
    big.raw_input_contents[0] = b"\0" * (64 * 1024 * 1024 + 16)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(big, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30).live


def test_malformed_protobuf_is_invalid_argument(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\x0f not a protobuf", timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"malformed {method}Request" in info.value.details()
        unimplemented = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        with pytest.raises(grpc.RpcError) as info:
            unimplemented(b"", timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
