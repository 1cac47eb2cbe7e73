"""Pre-encoded requests decode with the gateway's own codec; answers and HTTP framing parse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ensemble.oip.rest import decode_infer_request, encode_infer_response
from ensemble.types import InferRequest, InferResponse, Tensor
from loadtest import httpclient
from loadtest.clients import HttpBinaryClient, HttpJsonClient, RequestShape, Workload
from loadtest.httpclient import encode_request

X = np.arange(4 * 64, dtype=np.float32).reshape(4, 64) / 7
Y = np.array([3, 1, 4, 1])
WORK = Workload(X, Y, batch_size=2)
CLASSES = [{}, {"priority": 2, "policy": "vote", "timeout": 5000}]


def shape(endpoint: str = "infer") -> RequestShape:
    return RequestShape("digits", endpoint, "input", "label", 5.0, CLASSES)


def split_http(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return first, headers, body


@pytest.mark.parametrize("cls", [HttpJsonClient, HttpBinaryClient])
def test_requests_decode_with_the_gateway_codec(cls: type[HttpJsonClient]) -> None:
    client = cls("http://127.0.0.1:8000", shape(), WORK, connections=4)
    assert [len(p) for p in client.payloads] == [2, 2]  # classes x batches
    first, headers, body = split_http(client.payloads[1][1])
    assert first == "POST /v2/models/digits/infer HTTP/1.1"
    assert headers["host"] == "127.0.0.1:8000"
    request = decode_infer_request(
        body, headers.get("inference-header-content-length"), "digits", None
    )
    (tensor,) = request.inputs
    assert tensor.name == "input" and tensor.datatype == "FP32" and tensor.shape == (2, 64)
    np.testing.assert_array_equal(tensor.data, X[2:4])
    assert request.parameters == CLASSES[1]
    assert request.outputs is not None and request.outputs[0].name == "label"
    assert request.outputs[0].binary is (cls is HttpBinaryClient)


def answer_body(binary: bool, labels: list[int]) -> tuple[bytes, int | None]:
    tensors = [
        Tensor("probabilities", "FP32", (len(labels), 2), np.zeros((len(labels), 2), np.float32)),
        Tensor("label", "INT64", (len(labels),), np.array(labels, dtype=np.int64)),
    ]
    request = InferRequest("digits", None, [], parameters={"binary_data_output": binary})
    return encode_infer_response(InferResponse("digits", "1", tensors), request)


@pytest.mark.parametrize("binary", [False, True])
def test_labels_parse_from_gateway_answers(binary: bool) -> None:
    client = HttpBinaryClient("http://127.0.0.1:8000", shape(), WORK, connections=1)
    body, hlen = answer_body(binary, [7, 2])
    got: list[Any] = []
    client._answer(200, hlen, body, None, lambda *args: got.append(args))
    assert got == [(None, [7, 2], False)]


@pytest.mark.parametrize("binary", [False, True])
def test_degraded_answers_are_flagged(binary: bool) -> None:
    client = HttpBinaryClient("http://127.0.0.1:8000", shape(), WORK, connections=1)
    tensors = [Tensor("label", "INT64", (1,), np.array([5], dtype=np.int64))]
    request = InferRequest("digits", None, [], parameters={"binary_data_output": binary})
    got: list[Any] = []
    for params in ({"degraded": True, "unreachable": "svm"}, {"completeness": 1.0}):
        answer = InferResponse("digits", "1", tensors, parameters=params)
        body, hlen = encode_infer_response(answer, request)
        client._answer(200, hlen, body, None, lambda *args: got.append(args))
    assert got == [(None, [5], True), (None, [5], False)]


def test_http_errors_and_bad_answers() -> None:
    client = HttpJsonClient("http://127.0.0.1:8000", shape(), WORK, connections=1)
    got: list[Any] = []

    def answer(err: str | None, labels: Any, degraded: bool = False) -> None:
        got.append((err, labels))

    client._answer(503, None, b'{"error": "draining"}', None, answer)
    client._answer(200, None, b'{"outputs": []}', None, answer)
    client._answer(0, None, b"", "timeout", answer)
    assert got == [("http_503", None), ("bad_response", None), ("timeout", None)]
    assert client.error_samples["http_503"] == "draining"


def test_live_endpoint_sends_the_liveness_route() -> None:
    client = HttpBinaryClient("http://127.0.0.1:9", shape("live"), WORK, connections=1)
    assert client.payloads[0][0] == b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
    got: list[Any] = []
    client._answer(200, None, b"", None, lambda *args: got.append(args))
    assert got == [(None, None)]


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


class FakePool:
    def __init__(self) -> None:
        self.released = 0
        self.finished: list[tuple[int, int | None, bytes, str | None]] = []

    def _release(self, conn: Any) -> None:
        self.released += 1

    def _finish(
        self, pending: Any, status: int, hlen: int | None, body: bytes, err: str | None
    ) -> None:
        self.finished.append((status, hlen, body, err))


def connection() -> tuple[Any, FakePool, FakeTransport]:
    pool, transport = FakePool(), FakeTransport()
    conn = httpclient._Connection(pool)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.start(httpclient._Pending(b"GET / HTTP/1.1\r\n\r\n", lambda *a: None, 0.0))
    return conn, pool, transport


def test_response_split_across_reads() -> None:
    conn, pool, transport = connection()
    raw = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
           b"Inference-Header-Content-Length: 2\r\nContent-Length: 5\r\n\r\n{}abc")  # fmt: skip
    for i in range(0, len(raw), 7):
        conn.data_received(raw[i : i + 7])
    assert pool.finished == [(200, 2, b"{}abc", None)]
    assert pool.released == 1 and not transport.aborted
    assert transport.written == [b"GET / HTTP/1.1\r\n\r\n"]


def test_connection_close_and_bad_responses() -> None:
    conn, pool, transport = connection()
    conn.data_received(b"HTTP/1.1 503 X\r\nConnection: close\r\ncontent-length: 0\r\n\r\n")
    assert pool.finished == [(503, None, b"", None)] and transport.aborted and not pool.released
    conn, pool, transport = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert pool.finished == [(0, None, b"", "bad_response")] and transport.aborted


def test_encode_request() -> None:
    raw = encode_request("POST", "h:1", "/p", b"xy", {"Content-Type": "a/b"})
    assert (
        raw == b"POST /p HTTP/1.1\r\nHost: h:1\r\nContent-Type: a/b\r\nContent-Length: 2\r\n\r\nxy"
    )
