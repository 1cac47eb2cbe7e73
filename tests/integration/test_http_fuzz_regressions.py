"""Inputs a fuzzer found: each answers 4xx with {"error": ...} and the gateway keeps serving."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import numpy as np
import pytest

from tests.integration.conftest import good_input
from tests.integration.process import GatewayProcess

pytestmark = pytest.mark.integration
INFER = "/v2/models/digits/infer"


def assert_error(resp: httpx.Response, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert fragment in resp.json()["error"], resp.json()


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (good_input(datatype=["FP32"]), "unknown datatype"),
        (good_input(datatype={"FP32": 1}), "unknown datatype"),
        (good_input(shape=[1] * 70, data=[0.0]), "70 dimensions"),
        (good_input(shape=[0, 2**63], data=[]), "cannot be allocated"),
        (good_input(datatype="BYTES", shape=[2**63, 0], data=[]), "cannot be allocated"),
        (
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [0, 2**63],
                "parameters": {"binary_data_size": 0},
            },
            "cannot be allocated",
        ),
    ],
)
@pytest.mark.parametrize("model", ["digits", "logreg"])
def test_unusable_datatype_or_shape_is_400(
    raw: httpx.Client, model: str, tensor: dict[str, object], fragment: str
) -> None:
    body = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Content-Type": "application/json"}
    if "parameters" in tensor:
        headers["Inference-Header-Content-Length"] = str(len(body))
    resp = raw.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert_error(resp, 400, fragment)
    assert raw.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/v2", "GET"),
        ("DELETE", "/v2/health/live", "GET"),
        ("OPTIONS", "/v2/models/digits", "GET"),
        ("PUT", "/v2/models/digits/versions/1/ready", "GET"),
        ("GET", INFER, "POST"),
        ("PATCH", "/v2/repository/index", "GET, POST"),
    ],
)
def test_405_names_the_allowed_methods(
    raw: httpx.Client, method: str, path: str, allow: str
) -> None:
    resp = raw.request(method, path)
    assert_error(resp, 405, "not allowed")
    assert resp.headers["allow"] == allow


@pytest.mark.parametrize(
    ("body", "encoding", "fragment"),
    [
        (gzip.compress(b'{"inputs": []}')[:-6], "gzip", "truncated gzip"),
        (gzip.compress(b'{"inputs": []}') + b"junk", "gzip", "after the end of its gzip"),
        (zlib.compress(b'{"inputs": []}') + b"\0", "deflate", "after the end of its deflate"),
    ],
)
def test_damaged_compressed_body_is_400(
    raw: httpx.Client, body: bytes, encoding: str, fragment: str
) -> None:
    resp = raw.post(INFER, content=body, headers={"Content-Encoding": encoding})
    assert_error(resp, 400, fragment)


def test_connection_keeps_serving_after_errors(raw: httpx.Client) -> None:
    bad = json.dumps({"inputs": [good_input(shape=[0, 2**63], data=[])]}).encode()
    good = json.dumps({"inputs": [good_input()]}).encode()
    for _ in range(3):
        assert raw.post(INFER, content=bad).status_code == 400
        assert raw.request("TRACE", INFER).status_code == 405
        assert raw.post(INFER, content=good).status_code == 200


def test_extreme_inputs_never_yield_non_finite_answers(raw: httpx.Client) -> None:
    for value in (3e38, -3e38):
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [value] * 64}
            ]
        }
        resp = raw.post("/v2/models/digits/infer", json=body)
        if resp.status_code == 200:
            doc = resp.json()
            probs = doc["outputs"][1]["data"]
            assert all(isinstance(p, float) for p in probs), doc
            assert doc["parameters"]["completeness"] <= 1.0
        else:
            assert resp.status_code == 400 and "non-finite" in resp.json()["error"]
    nan = np.full((1, 64), np.nan, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": len(nan)},
                }
            ]
        }
    ).encode()
    resp = raw.post(
        "/v2/models/digits/infer",
        content=header + nan,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 200:
        assert None not in resp.json()["outputs"][1]["data"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"get /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00",  # a TLS hello on the plain-HTTP port
    ],
)
def test_unparseable_http_gets_an_oip_error_body(
    gateway: GatewayProcess, request_bytes: bytes
) -> None:
    import socket

    with socket.create_connection((gateway.host, gateway.http_port), timeout=10) as sock:
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head
    assert "malformed HTTP request" in json.loads(body)["error"]
