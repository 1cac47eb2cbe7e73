"""OIP REST through real clients (tritonclient.http, binary and JSON; raw httpx for bad input)."""

from __future__ import annotations

import gzip
import json
import re

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import good_input
from tests.integration.process import GatewayProcess

pytestmark = pytest.mark.integration
MEMBERS = ["mlp_small_int8", "logreg", "forest", "mlp_large", "svm"]


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(gateway.http_target, concurrency=4)


def infer(
    client: httpclient.InferenceServerClient,
    model: str,
    x: np.ndarray,
    binary: bool,
    outputs: tuple[str, ...] = ("label", "probabilities"),
) -> httpclient.InferResult:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return client.infer(model, [inp], outputs=outs)


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "ensemble-gateway"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["platform"] == "ensemble" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert meta["outputs"][1]["shape"] == [-1, 10]
    assert client.get_model_metadata("digits", "1")["name"] == "digits"
    for name in ["digits", *MEMBERS]:
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1")
    member = client.get_model_metadata("logreg")
    assert member["platform"] == "onnxruntime_onnx"
    assert {o["name"] for o in member["outputs"]} == {"label", "probabilities"}
    config = client.get_model_config("digits")
    assert config["parameters"]["members"]["string_value"] == ",".join(MEMBERS)
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert index == dict.fromkeys(["digits", *MEMBERS], "READY")


def test_model_config_and_index_say_the_same_over_http_and_grpc(
    client: httpclient.InferenceServerClient, gateway: GatewayProcess, raw: httpx.Client
) -> None:
    grpc = grpcclient.InferenceServerClient(gateway.grpc_target)
    for name in ("digits", "logreg"):
        http = client.get_model_config(name)
        other = grpc.get_model_config(name, as_json=True)["config"]
        # Every tensor's first dimension is the batch: Triton reports max_batch_size > 0 and
        # dims without it, over both protocols.
        assert http["max_batch_size"] == int(other["max_batch_size"]) > 0
        assert [i["dims"] for i in http["input"]] == [[64]]
        assert [[int(d) for d in i["dims"]] for i in other["input"]] == [[64]]
    ready = raw.post("/v2/repository/index", json={"ready": True})
    assert ready.status_code == 200
    assert {m["name"] for m in ready.json()} == {"digits", *MEMBERS}
    assert {m["state"] for m in ready.json()} == {"READY"}


def test_ensemble_accuracy_over_test_split_binary(
    client: httpclient.InferenceServerClient, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    labels = []
    for i in range(len(x)):
        result = infer(client, "digits", x[i : i + 1], binary=True)
        labels.append(int(result.as_numpy("label")[0]))
        probs = result.as_numpy("probabilities")
        assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1.0) < 1e-3
    ensemble_acc = float(np.mean(np.asarray(labels) == y))
    member_acc = {}
    for name in MEMBERS:
        result = infer(client, name, x, binary=True, outputs=("label",))
        member_acc[name] = float(np.mean(result.as_numpy("label") == y))
    best = max(member_acc.values())
    assert ensemble_acc >= best - 0.01, (ensemble_acc, member_acc)


def test_ensemble_batch_json_matches_binary(
    client: httpclient.InferenceServerClient, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    json_result = infer(client, "digits", x, binary=False)
    binary_result = infer(client, "digits", x, binary=True)
    assert np.array_equal(json_result.as_numpy("label"), binary_result.as_numpy("label"))
    np.testing.assert_allclose(
        json_result.as_numpy("probabilities"), binary_result.as_numpy("probabilities"), atol=1e-6
    )
    assert float(np.mean(json_result.as_numpy("label") == y)) > 0.9


def test_response_parameters_say_who_answered(raw: httpx.Client) -> None:
    body = {
        "id": "abc",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
    }
    doc = raw.post("/v2/models/digits/infer", json=body).json()
    assert doc["id"] == "abc" and doc["model_name"] == "digits" and doc["model_version"] == "1"
    params = doc["parameters"]
    assert params["members_asked"].split(",") == MEMBERS
    answered = dict(item.split("@") for item in params["members_answered"].split(","))
    assert answered == {
        "mlp_small_int8": "edge",
        "logreg": "edge",
        "forest": "edge",
        "mlp_large": "cloud",
        "svm": "cloud",
    }
    assert params["completeness"] == 1.0
    assert 0.0 < params["confidence"] <= 1.0
    assert params["policy"] == "default"


def test_gzip_request_body(raw: httpx.Client) -> None:
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
    ).encode()
    resp = raw.post(
        "/v2/models/digits/infer",
        content=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text


def test_metrics_parse_with_prometheus_parser(
    raw: httpx.Client, client: httpclient.InferenceServerClient
) -> None:
    infer(client, "digits", np.zeros((1, 64), np.float32), binary=True)
    text = raw.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["ensemble_requests"]
    ok = [
        s
        for s in requests.samples
        if s.name == "ensemble_requests_total"
        and s.labels == {"model": "digits", "protocol": "http", "outcome": "success"}
    ]
    assert ok and ok[0].value >= 1
    latency = families["ensemble_request_duration_seconds"]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in latency.samples)
    member = families["ensemble_member_call_duration_seconds"]
    tiers = {s.labels.get("tier") for s in member.samples if s.name.endswith("_count")}
    assert tiers == {"edge", "cloud"}


# ---- bad input: each answers 4xx with {"error": ...} and the gateway keeps serving ----------


def post(
    raw: httpx.Client, path: str, content: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return raw.post(path, content=content, headers=headers or {})


BAD_JSON_CASES = {
    "malformed_json": (b'{"inputs": [', 400, "malformed JSON"),
    "not_an_object": (b"[1, 2]", 400, "JSON object"),
    "missing_inputs": (b"{}", 400, "'inputs'"),
    "missing_tensor": (json.dumps({"inputs": []}).encode(), 400, "'inputs'"),
    "unknown_tensor": (
        json.dumps({"inputs": [good_input(name="pixels")]}).encode(),
        400,
        "unknown input 'pixels'",
    ),
    "extra_tensor": (
        json.dumps({"inputs": [good_input(), good_input(name="more")]}).encode(),
        400,
        "unknown input 'more'",
    ),
    "duplicate_tensor": (
        json.dumps({"inputs": [good_input(), good_input()]}).encode(),
        400,
        "more than once",
    ),
    "wrong_shape": (
        json.dumps({"inputs": [good_input(shape=[1, 63], data=[0.0] * 63)]}).encode(),
        400,
        "does not match",
    ),
    "wrong_rank": (
        json.dumps({"inputs": [good_input(shape=[64])]}).encode(),
        400,
        "does not match",
    ),
    "wrong_datatype": (
        json.dumps({"inputs": [good_input(datatype="INT32", data=[0] * 64)]}).encode(),
        400,
        "datatype INT32",
    ),
    "unknown_datatype": (
        json.dumps({"inputs": [good_input(datatype="FLOAT32")]}).encode(),
        400,
        "unknown datatype",
    ),
    "data_length": (
        json.dumps({"inputs": [good_input(data=[0.0] * 60)]}).encode(),
        400,
        "needs 64 elements",
    ),
    "data_not_numbers": (
        json.dumps({"inputs": [good_input(data=["x"] * 64)]}).encode(),
        400,
        "must be numbers",
    ),
    "unknown_output": (
        json.dumps({"inputs": [good_input()], "outputs": [{"name": "logits"}]}).encode(),
        400,
        "unknown output 'logits'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_CASES))
def test_bad_json_requests(raw: httpx.Client, case: str) -> None:
    body, status, fragment = BAD_JSON_CASES[case]
    resp = post(raw, "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]
    assert raw.get("/v2/health/ready").status_code == 200


def binary_body(n_bytes: int, declared: int, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    ).encode()
    body = header + np.zeros(n_bytes // 4, "<f4").tobytes() + extra
    return body, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


@pytest.mark.parametrize(
    ("n_bytes", "declared", "header_delta", "fragment"),
    [
        (256, 256, 0, None),
        (252, 252, 0, "needs 256 bytes"),
        (256, 300, 0, "runs past the end"),
        (256, 128, 0, "needs 256 bytes"),
        (256, 256, 5, "Inference-Header-Content-Length|malformed JSON"),
        (256, 256, -3, "malformed JSON"),
        (256, 256, 10_000, "outside the body"),
    ],
)
def test_binary_extension_lengths(
    raw: httpx.Client, n_bytes: int, declared: int, header_delta: int, fragment: str | None
) -> None:
    body, headers = binary_body(n_bytes, declared)
    headers["Inference-Header-Content-Length"] = str(
        int(headers["Inference-Header-Content-Length"]) + header_delta
    )
    resp = post(raw, "/v2/models/digits/infer", body, headers)
    if fragment is None:
        assert resp.status_code == 200, resp.text
        return
    assert resp.status_code == 400, resp.text
    assert re.search(fragment, resp.json()["error"]), resp.json()


def test_binary_trailing_bytes_rejected(raw: httpx.Client) -> None:
    body, headers = binary_body(256, 256, extra=b"\0" * 8)
    resp = post(raw, "/v2/models/digits/infer", body, headers)
    assert resp.status_code == 400 and "binary data is 264 bytes" in resp.json()["error"]


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/v2/models/nope/infer", "unknown model 'nope'"),
        ("/v2/models/digits/versions/2/infer", "no version '2'"),
    ],
)
def test_unknown_model_or_version(raw: httpx.Client, path: str, fragment: str) -> None:
    resp = post(raw, path, json.dumps({"inputs": [good_input()]}).encode())
    assert resp.status_code == 404 and fragment in resp.json()["error"]
    meta_path = path.removesuffix("/infer")
    assert raw.get(meta_path).status_code == 404
    assert raw.get(meta_path + "/ready").status_code == 404


def test_unknown_route_and_method(raw: httpx.Client) -> None:
    resp = raw.get("/v2/nothing")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = raw.get("/v2/models/digits/infer")
    assert resp.status_code == 405 and "POST" in resp.json()["error"]


def test_body_over_limit_is_413(raw: httpx.Client) -> None:
    big = b" " * (64 * 1024 * 1024 + 1)
    resp = post(raw, "/v2/models/digits/infer", big)
    assert resp.status_code == 413 and "exceeds the limit" in resp.json()["error"]
    assert raw.get("/v2/health/live").status_code == 200


def test_tritonclient_sees_clear_errors(client: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("input", [1, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 32), np.float32))
    with pytest.raises(InferenceServerException, match="does not match"):
        client.infer("digits", [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    assert client.is_server_ready()
