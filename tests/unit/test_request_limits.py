"""Per-request limits: element budgets, the comma guard, bounded inflation, cut messages,
non-finite input, and body reading with its size and time limits (fake ASGI receive)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import numpy as np
import pytest

from ensemble.dataplane.validation import check_inputs
from ensemble.errors import (
    MAX_MESSAGE_CHARS,
    REJECTION_REASONS,
    EnsembleError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    clip,
)
from ensemble.frontends.body import inflate, read_body
from ensemble.frontends.deadlines import ReadDeadlines
from ensemble.frontends.limits import (
    INFLATE_FLOOR_BYTES,
    SEPARATOR_SLACK,
    Offload,
    RequestLimits,
    ValueGuard,
    counts_values,
)
from ensemble.oip import grpc as grpc_codec
from ensemble.oip import rest as rest_codec
from ensemble.types import ModelMetadata, Tensor, TensorSpec

LIMITS = RequestLimits(max_bytes=8 * 2**20, max_batch_size=100, max_elements=1_000_000)


def meta(*specs: tuple[str, str, tuple[int, ...]]) -> ModelMetadata:
    tensors = tuple(TensorSpec(n, d, s) for n, d, s in specs)
    return ModelMetadata("m", ("1",), "onnx", tensors, ())


def test_a_models_element_budget_is_max_batch_rows_of_its_inputs() -> None:
    assert LIMITS.elements(meta(("x", "FP32", (-1, 64)))) == 6_400
    assert LIMITS.elements(meta(("x", "FP32", (-1, 64)), ("y", "INT64", (-1, 2)))) == 6_600
    assert LIMITS.elements(meta(("x", "FP32", (3, 4)))) == 12  # a fixed batch
    assert LIMITS.elements(meta(("x", "FP32", ()))) == 1
    assert LIMITS.elements(meta(("x", "FP32", (-1, -1)))) == 1_000_000  # the server's cap
    small = RequestLimits(max_batch_size=100, max_elements=1000)
    assert small.elements(meta(("x", "FP32", (-1, 64)))) == 1000
    assert counts_values(meta(("x", "FP32", (-1, 64))))
    assert not counts_values(meta(("x", "FP32", (-1, 64)), ("t", "BYTES", (-1,))))


def test_value_guard_counts_commas_across_chunks_and_stops_past_its_limit() -> None:
    guard = ValueGuard(10, "m")
    limit = 10 + SEPARATOR_SLACK
    guard.feed(b"," * limit)  # at the limit: fine
    with pytest.raises(PayloadTooLarge, match=r"more than 10 values.*model 'm'"):
        guard.feed(b",")


def test_value_guard_reads_only_the_json_part_of_a_binary_body() -> None:
    guard = ValueGuard(0, "m", json_end=4)
    guard.feed(b"{,,}" + b"," * (2 * SEPARATOR_SLACK))  # binary data may hold any byte
    guard.feed(b"," * (2 * SEPARATOR_SLACK))
    with pytest.raises(PayloadTooLarge):
        ValueGuard(0, "m", json_end=SEPARATOR_SLACK + 2).feed(b"," * (SEPARATOR_SLACK + 1))


def test_inflate_stops_at_the_ratio_without_inflating_the_rest() -> None:
    bomb = gzip.compress(b"\0" * (64 * 2**20))
    assert len(bomb) * 100 > INFLATE_FLOOR_BYTES
    with pytest.raises(PayloadTooLarge, match=r"100 times its .* bytes.*max_inflate_ratio"):
        inflate(bomb, "gzip", RequestLimits(max_bytes=128 * 2**20))
    with pytest.raises(PayloadTooLarge, match=r"limit of 1048576 bytes.*max_request_bytes"):
        inflate(bomb, "gzip", RequestLimits(max_bytes=2**20, max_inflate_ratio=1e6))


def test_inflate_exempts_small_bodies_from_the_ratio() -> None:
    body = b"0," * 100_000  # 200 kB compressing about 1000:1
    assert inflate(zlib.compress(body, 9), "deflate", LIMITS) == body


def test_inflate_feeds_the_guard_as_it_goes() -> None:
    body = gzip.compress(b"[" + b"0," * 5_000_000 + b"0]")
    with pytest.raises(PayloadTooLarge, match="more than 100 values"):
        inflate(body, "gzip", RequestLimits(max_bytes=64 * 2**20), ValueGuard(100, "m"))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not gzip", "not valid gzip"),
        (gzip.compress(b"{}")[:-4], "truncated"),
        (gzip.compress(b"{}") + gzip.compress(b"{}"), "after the end"),
    ],
)
def test_inflate_refuses_bad_compressed_data(body: bytes, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        inflate(body, "gzip", LIMITS)


class FakeReceive:
    """An ASGI receive that hands out ``chunks``, then waits forever when ``hang``."""

    def __init__(self, chunks: list[bytes], hang: bool = False) -> None:
        self.chunks = chunks
        self.hang = hang

    async def __call__(self) -> dict[str, Any]:
        if not self.chunks:
            if self.hang:
                await asyncio.Event().wait()
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = self.chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks or self.hang)}


def read(chunks: list[bytes], headers: dict[str, str], **kw: Any) -> bytes:
    limits = RequestLimits(**{"max_bytes": 1000, "read_timeout_s": 0.01, **kw})
    offload = Offload(limits)
    try:
        receive = FakeReceive(chunks, hang=kw.get("read_timeout_s") == 0.001)
        deadlines = ReadDeadlines(limits.read_timeout_s)
        return asyncio.run(read_body(receive, headers, limits, offload, deadlines, None))
    finally:
        offload.shutdown()


def test_read_body_limits_size_encoding_and_time() -> None:
    assert read([b"ab", b"cd"], {}) == b"abcd"
    with pytest.raises(PayloadTooLarge, match=r"1001 bytes.*max_request_bytes"):
        read([], {"content-length": "1001"})
    with pytest.raises(PayloadTooLarge, match="limit of 1000"):
        read([b"a" * 600, b"a" * 600], {})
    with pytest.raises(UnsupportedMediaType, match="'br'"):
        read([b"x"], {"content-encoding": "br"})
    with pytest.raises(RequestTimeout, match=r"server\.read_timeout_s"):
        read([b"{"], {}, read_timeout_s=0.001)
    assert read([zlib.compress(b"{}")], {"content-encoding": "deflate"}, offload_bytes=0) == b"{}"


def test_rest_shapes_over_the_budget_are_refused_before_their_data() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [10**9, 64], "data": [0]}]}
    with pytest.raises(PayloadTooLarge, match=r"64,000,000,000 elements.*at most 6,400"):
        rest_codec.decode_infer_request(json.dumps(doc).encode(), None, "m", None, 6_400)


def test_rest_data_of_the_wrong_length_is_refused_before_conversion() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[0] * 3]}]}
    with pytest.raises(InvalidInput, match="needs 2 elements, data has 3"):
        rest_codec.decode_infer_request(json.dumps(doc).encode(), None, "m", None)


def test_grpc_shapes_over_the_budget_are_refused_before_their_data() -> None:
    from tritonclient.grpc import service_pb2

    msg = service_pb2.ModelInferRequest(
        model_name="m",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [5000, 64]}],
        raw_input_contents=[b""],
    )
    with pytest.raises(PayloadTooLarge, match="320,000 elements"):
        grpc_codec.decode_infer_request(msg, 6_400)


def test_ids_are_strings_of_bounded_length() -> None:
    doc = {
        "id": "i" * 2000,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}],
    }
    with pytest.raises(InvalidInput, match=r"2,000 characters; at most 1024"):
        rest_codec.decode_infer_request(json.dumps(doc).encode(), None, "m", None)


def test_messages_quote_client_strings_cut() -> None:
    assert clip("abc") == "abc"
    assert clip("a" * 100, 10) == "aaaaaaaaaa...(100 characters)"
    assert len(EnsembleError("x" * 10**6).message) < MAX_MESSAGE_CHARS + 40
    doc = {"inputs": [{"name": "n" * 10**6, "datatype": "FP32", "shape": [1], "data": ["s"]}]}
    with pytest.raises(InvalidInput) as info:
        rest_codec.decode_infer_request(json.dumps(doc).encode(), None, "m", None)
    assert len(str(info.value)) < 300


def test_every_error_names_a_known_reason() -> None:
    def subclasses(cls: type[EnsembleError]) -> list[type[EnsembleError]]:
        return [cls, *(s for c in cls.__subclasses__() for s in subclasses(c))]

    import ensemble.dataplane.feedback
    import ensemble.frontends.http

    # their errors are EnsembleErrors too
    assert ensemble.dataplane.feedback and ensemble.frontends.http

    reasons = {cls: cls.reason for cls in subclasses(EnsembleError)}
    assert set(reasons.values()) <= set(REJECTION_REASONS)
    # Every error a client can get says what it is; only errors no request raises (the root,
    # a model file refused while a config loads) are `internal`.
    internal = {cls.__name__ for cls, reason in reasons.items() if reason == "internal"}
    assert internal == {"EnsembleError", "ModelIntegrityError", "_Outcome"}


def feed(x: np.ndarray) -> list[Tensor]:
    return [Tensor("x", "FP32", x.shape, x)]


def test_non_finite_floats_are_refused_unless_allowed() -> None:
    spec = meta(("x", "FP32", (-1, 4)))
    x = np.zeros((2, 4), np.float32)
    check_inputs(spec, feed(x), 10)
    x[1, 2] = np.inf
    with pytest.raises(InvalidInput, match=r"1 NaN or infinite value\(s\), the first at \[1, 2\]"):
        check_inputs(spec, feed(x), 10)
    assert check_inputs(spec, feed(x), 10, allow_non_finite=True)["x"] is x
    big = np.full((2, 4), 1e308, np.float64)  # a sum that overflows, every value finite
    check_inputs(meta(("x", "FP64", (-1, 4))), [Tensor("x", "FP64", (2, 4), big)], 10)
