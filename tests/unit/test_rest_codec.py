"""REST codec: JSON and binary tensors in, JSON and binary out; every defect is InvalidInput."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from ensemble.errors import InvalidInput
from ensemble.oip.rest import (
    decode_infer_request,
    encode_infer_response,
    may_set_priority,
)
from ensemble.types import InferResponse, Tensor


def decode(doc: object, binary: bytes = b"", header: bool = False) -> object:
    body = orjson.dumps(doc)
    length = str(len(body)) if header or binary else None
    return decode_infer_request(body + binary, length, "m", None)


def bad(doc: object, binary: bytes = b"", match: str = "") -> str:
    with pytest.raises(InvalidInput, match=match) as info:
        decode(doc, binary)
    return str(info.value)


def inp(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_json_tensor_decoded_with_shape() -> None:
    req = decode({"id": "7", "inputs": [inp(data=[[1.5, 2]])], "parameters": {"timeout": 5}})
    t = req.inputs[0]  # type: ignore[attr-defined]
    assert t.data.dtype == np.float32 and t.data.shape == (1, 2)
    assert t.data.tolist() == [[1.5, 2.0]]
    assert req.id == "7" and req.parameters == {"timeout": 5}  # type: ignore[attr-defined]


def test_binary_tensor_decoded() -> None:
    raw = np.array([[1, 2, 3]], dtype="<i8").tobytes()
    doc = {
        "inputs": [
            inp(
                datatype="INT64", shape=[1, 3], data=None, parameters={"binary_data_size": len(raw)}
            )
        ]
    }
    req = decode(doc, raw)
    assert req.inputs[0].data.tolist() == [[1, 2, 3]]  # type: ignore[attr-defined]


def test_bytes_tensor_json_and_binary() -> None:
    req = decode({"inputs": [inp(datatype="BYTES", shape=[2], data=["a", "bc"])]})
    assert req.inputs[0].data.tolist() == [b"a", b"bc"]  # type: ignore[attr-defined]
    raw = struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"
    doc = {
        "inputs": [
            inp(datatype="BYTES", shape=[2], data=None, parameters={"binary_data_size": len(raw)})
        ]
    }
    assert decode(doc, raw).inputs[0].data.tolist() == [b"a", b"bc"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "JSON object"),
        ({}, "'inputs'"),
        ({"inputs": []}, "'inputs'"),
        ({"inputs": [1]}, "object"),
        ({"inputs": [inp(name="")]}, "'name'"),
        ({"inputs": [inp(datatype="FLOAT")]}, "unknown datatype"),
        ({"inputs": [inp(shape=[1, -2])]}, "'shape'"),
        ({"inputs": [inp(shape=[1, True])]}, "'shape'"),
        ({"inputs": [inp(shape="12")]}, "'shape'"),
        ({"inputs": [inp(data=[1, 2, 3])]}, "needs 2 elements"),
        ({"inputs": [inp(data=["1", "2"])]}, "must be numbers"),
        ({"inputs": [inp(data=[True, False])]}, "must be numbers"),
        ({"inputs": [inp(data=[1.5, True])]}, "must be numbers"),  # numpy would make it 1.0
        ({"inputs": [inp(data=[1, None])]}, "must be numbers"),
        ({"inputs": [inp(data=[[1], [2, 3]])]}, "numbers|fit|needs 2 elements"),
        ({"inputs": [inp(data=None)]}, "needs 'data'"),
        ({"inputs": [inp(data=5)]}, "JSON array"),
        ({"inputs": [inp(datatype="UINT8", data=[1, 300])]}, "fit"),
        ({"inputs": [inp(datatype="BOOL", data=[1, 0])]}, "true or false"),
        ({"inputs": [inp(datatype="BYTES", shape=[2], data=[1, 2])]}, "strings"),
        ({"inputs": [inp(parameters=[1])]}, "parameters"),
        ({"inputs": [inp(parameters={"a": [1]})]}, "parameter 'a'"),
        ({"inputs": [inp()], "id": 5}, "'id'"),
        ({"inputs": [inp()], "outputs": {}}, "'outputs'"),
        ({"inputs": [inp()], "outputs": [{"nam": "x"}]}, "string 'name'"),
        (
            {"inputs": [inp()], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
            "binary_data",
        ),
    ],
)
def test_malformed_requests(doc: object, match: str) -> None:
    bad(doc, match=match)


def test_malformed_json() -> None:
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_infer_request(b'{"inputs": [', None, "m", None)


def test_binary_sizes_must_add_up() -> None:
    raw = np.zeros(2, dtype="<f4").tobytes()
    doc = {"inputs": [inp(data=None, parameters={"binary_data_size": 8})]}
    bad(doc, raw + b"xx", match="binary data is 10 bytes")
    bad(doc, raw[:4], match="runs past the end")
    doc4 = {"inputs": [inp(data=None, parameters={"binary_data_size": 4})]}
    bad(doc4, raw[:4], match="needs 8 bytes")


@pytest.mark.parametrize("header", ["abc", "0", "100000", "-1"])
def test_header_length_checked(header: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        decode_infer_request(b'{"inputs": []}', header, "m", None)


def test_encode_json_and_binary_outputs() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    resp = InferResponse(
        "m",
        "1",
        [Tensor("label", "INT64", (1,), np.array([1])), Tensor("p", "FP32", (1, 2), probs)],
        id="9",
        parameters={"confidence": 0.75},
    )
    req = decode(
        {
            "inputs": [inp()],
            "outputs": [{"name": "p", "parameters": {"binary_data": True}}, {"name": "label"}],
        }
    )
    body, header_length = encode_infer_response(resp, req)  # type: ignore[arg-type]
    assert header_length is not None
    doc = orjson.loads(body[:header_length])
    assert doc["id"] == "9" and doc["parameters"] == {"confidence": 0.75}
    label, p = doc["outputs"]
    assert label["data"] == [1]
    assert p["parameters"]["binary_data_size"] == 8
    assert np.frombuffer(body[header_length:], "<f4").tolist() == [0.25, 0.75]

    json_req = decode({"inputs": [inp()]})
    body, header_length = encode_infer_response(resp, json_req)  # type: ignore[arg-type]
    assert header_length is None
    assert orjson.loads(body)["outputs"][1]["data"] == [0.25, 0.75]

    all_binary = decode({"inputs": [inp()], "parameters": {"binary_data_output": True}})
    _, header_length = encode_infer_response(resp, all_binary)  # type: ignore[arg-type]
    assert header_length is not None


# ---- found by fuzzing the running gateway: each used to escape as a 500 -------------------


@pytest.mark.parametrize("datatype", [["FP32"], {"FP32": 1}, 32, None])
def test_non_string_datatype_is_invalid(datatype: object) -> None:
    bad({"inputs": [{**inp(), "datatype": datatype}]}, match="unknown datatype")


def test_shape_rank_beyond_numpy_is_invalid() -> None:
    bad({"inputs": [inp(shape=[1] * 70, data=[0])]}, match="70 dimensions")


@pytest.mark.parametrize("shape", [[0, 2**63], [2**63, 0], [0, 2**40, 2**40]])
@pytest.mark.parametrize("datatype", ["FP32", "BOOL", "BYTES"])
def test_empty_json_tensor_of_unallocatable_shape_is_invalid(
    shape: list[int], datatype: str
) -> None:
    bad({"inputs": [inp(datatype=datatype, shape=shape, data=[])]}, match="cannot be allocated")


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_empty_binary_tensor_of_unallocatable_shape_is_invalid(datatype: str) -> None:
    doc = {
        "inputs": [
            inp(datatype=datatype, shape=[0, 2**63], data=None, parameters={"binary_data_size": 0})
        ]
    }
    with pytest.raises(InvalidInput, match="cannot be allocated"):
        decode(doc, header=True)


def test_json_number_beyond_fp32_is_invalid_not_inf() -> None:
    message = bad({"inputs": [inp(data=[1e39, 1.0])]}, match="does not fit datatype FP32")
    assert "overflow" in message
    req = decode({"inputs": [inp(data=[1e30, 1.0], datatype="FP64")]})
    assert req.inputs[0].data.tolist() == [[1e30, 1.0]]  # type: ignore[attr-defined]


def test_may_set_priority_finds_the_key_in_the_json_part_only() -> None:
    assert may_set_priority(b'{"inputs": [], "parameters": {"priority": 3}}', None)
    assert may_set_priority(b'{"parameters": {"\\u0070riority": 3}}', None)  # spelt with an escape
    assert not may_set_priority(b'{"inputs": [], "parameters": {"timeout": 5}}', None)
    header = b'{"inputs": []}'
    body = header + b"priority\\u"  # the same bytes in binary tensor data do not count
    assert not may_set_priority(body, str(len(header)))
    assert may_set_priority(body, None)
