"""ModelInferRequest/ModelInferResponse <-> internal request/response conversion, no sockets."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from ensemble.errors import EnsembleError, InvalidInput
from ensemble.oip.datatypes import join_bytes_elements, split_bytes_elements
from ensemble.oip.grpc import (
    decode_infer_request,
    encode_infer_response,
    params_from_proto,
    params_to_proto,
)
from ensemble.types import InferResponse, RequestedOutput, Tensor


def make_request(
    *inputs: tuple[str, str, list[int]],
    raw: list[bytes] | None = None,
    model: str = "m",
) -> Any:
    msg = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape in inputs:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.extend(raw or [])
    return msg


def raw_request(name: str, array: np.ndarray, datatype: str) -> Any:
    blob = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
    return make_request((name, datatype, list(array.shape)), raw=[blob])


# -- raw contents ----------------------------------------------------------------------------


def test_raw_fp32_becomes_a_shaped_little_endian_array() -> None:
    x = np.arange(8, dtype="<f4").reshape(2, 4)
    request = decode_infer_request(raw_request("input", x, "FP32"))
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("input", "FP32", (2, 4))
    assert tensor.data.dtype == np.float32
    np.testing.assert_array_equal(tensor.data, x)


def test_raw_int64_and_fp16_keep_their_values() -> None:
    ints = np.array([[-(2**40), 0, 7]], dtype="<i8")
    halfs = np.array([0.5, -2.0], dtype="<f2")
    msg = make_request(
        ("a", "INT64", [1, 3]), ("b", "FP16", [2]), raw=[ints.tobytes(), halfs.tobytes()]
    )
    a, b = decode_infer_request(msg).inputs
    np.testing.assert_array_equal(a.data, ints)
    np.testing.assert_array_equal(b.data, halfs)
    assert b.data.dtype == np.float16


def test_raw_bytes_are_length_prefixed_elements() -> None:
    words = np.array([[b"hi", b""], [b"\x00\xff", "caf\u00e9".encode()]], dtype=np.object_)
    (tensor,) = decode_infer_request(raw_request("text", words, "BYTES")).inputs
    assert tensor.shape == (2, 2)
    assert tensor.data.dtype == np.object_
    assert tensor.data.tolist() == words.tolist()


def test_equal_length_bytes_elements_stay_one_element_each() -> None:
    words = np.array([b"ab", b"cd"], dtype=np.object_)
    (tensor,) = decode_infer_request(raw_request("text", words, "BYTES")).inputs
    assert tensor.data.shape == (2,)
    assert tensor.data[1] == b"cd"


def test_split_and_join_bytes_elements_round_trip() -> None:
    items = np.array([b"a", b"", b"xyz", "s"], dtype=np.object_)
    blob = join_bytes_elements(items)
    assert blob == b"".join(struct.pack("<I", len(x)) + x for x in [b"a", b"", b"xyz", b"s"])
    assert split_bytes_elements(blob, "here") == [b"a", b"", b"xyz", b"s"]


def test_empty_tensor_needs_no_data() -> None:
    (tensor,) = decode_infer_request(make_request(("input", "FP32", [0, 4]))).inputs
    assert tensor.data.shape == (0, 4)


# -- typed contents --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0, 0.0, 3.25], np.float32),
        ("FP64", "fp64_contents", [1e-300, 2.0, 3.0, 4.0], np.float64),
        ("INT64", "int64_contents", [-(2**62), 1, 2, 3], np.int64),
        ("INT8", "int_contents", [-128, 0, 1, 127], np.int8),
        ("INT32", "int_contents", [-(2**31), 0, 1, 2**31 - 1], np.int32),
        ("UINT8", "uint_contents", [0, 1, 2, 255], np.uint8),
        ("UINT64", "uint64_contents", [0, 1, 2, 2**64 - 1], np.uint64),
        ("BOOL", "bool_contents", [True, False, False, True], np.bool_),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list[Any], dtype: type) -> None:
    msg = make_request(("x", datatype, [2, 2]))
    getattr(msg.inputs[0].contents, field).extend(values)
    (tensor,) = decode_infer_request(msg).inputs
    assert tensor.data.dtype == dtype
    assert tensor.data.shape == (2, 2)
    np.testing.assert_array_equal(tensor.data.ravel(), np.array(values, dtype=dtype))


def test_typed_bytes_contents() -> None:
    msg = make_request(("text", "BYTES", [3]))
    msg.inputs[0].contents.bytes_contents.extend([b"a", b"bc", b""])
    (tensor,) = decode_infer_request(msg).inputs
    assert tensor.data.dtype == np.object_
    assert tensor.data.tolist() == [b"a", b"bc", b""]


# -- request fields --------------------------------------------------------------------------


def test_request_fields_parameters_and_requested_outputs() -> None:
    msg = raw_request("input", np.zeros((1, 4), np.float32), "FP32")
    msg.model_name = "iris"
    msg.model_version = "1"
    msg.id = "req-7"
    msg.parameters["timeout"].int64_param = 5000
    msg.parameters["priority"].uint64_param = 2
    msg.parameters["tier"].string_param = "edge"
    msg.parameters["min_accuracy"].double_param = 0.9
    msg.parameters["strict"].bool_param = True
    msg.inputs[0].parameters["note"].string_param = "first"
    msg.outputs.add(name="label")
    msg.outputs.add(name="probabilities")
    request = decode_infer_request(msg)
    assert (request.model_name, request.model_version, request.id) == ("iris", "1", "req-7")
    assert request.parameters == {
        "timeout": 5000,
        "priority": 2,
        "tier": "edge",
        "min_accuracy": 0.9,
        "strict": True,
    }
    assert request.inputs[0].parameters == {"note": "first"}
    assert request.outputs == [RequestedOutput("label"), RequestedOutput("probabilities")]


def test_empty_version_id_and_outputs_mean_unset() -> None:
    request = decode_infer_request(raw_request("input", np.zeros((1, 4), np.float32), "FP32"))
    assert request.model_version is None
    assert request.id is None
    assert request.outputs is None
    assert request.parameters == {}


def test_parameters_round_trip() -> None:
    params = {"flag": False, "n": -3, "big": 2**64 - 1, "ratio": 0.25, "who": "edge"}
    msg = service_pb2.ModelInferResponse()
    params_to_proto(params, msg.parameters)
    assert msg.parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert msg.parameters["n"].WhichOneof("parameter_choice") == "int64_param"
    assert msg.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert msg.parameters["ratio"].WhichOneof("parameter_choice") == "double_param"
    assert msg.parameters["who"].WhichOneof("parameter_choice") == "string_param"
    assert params_from_proto(msg.parameters, "response") == params


def test_parameter_beyond_64_bits_is_a_server_error() -> None:
    with pytest.raises(EnsembleError, match="'huge'"):
        params_to_proto({"huge": 2**64}, service_pb2.ModelInferResponse().parameters)


# -- malformed requests ----------------------------------------------------------------------

FOUR_FLOATS = np.zeros(4, np.float32).tobytes()


def _mixed() -> Any:
    msg = make_request(("a", "FP32", [4]), ("b", "FP32", [1]), raw=[FOUR_FLOATS, FOUR_FLOATS])
    msg.inputs[1].contents.fp32_contents.append(1.0)
    return msg


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> Any:
    msg = make_request(("x", datatype, shape))
    getattr(msg.inputs[0].contents, field).extend(values)
    return msg


def _with_input_param(key: str) -> Any:
    msg = make_request(("x", "FP32", [4]), raw=[FOUR_FLOATS])
    msg.inputs[0].parameters[key].string_param = "region"
    return msg


def _with_output_param(key: str, value: int) -> Any:
    msg = make_request(("x", "FP32", [4]), raw=[FOUR_FLOATS])
    msg.outputs.add(name="probabilities").parameters[key].int64_param = value
    return msg


def _empty_parameter() -> Any:
    msg = make_request(("x", "FP32", [4]), raw=[FOUR_FLOATS])
    msg.parameters["timeout"].SetInParent()
    return msg


def _bytes_raw(blob: bytes, shape: list[int]) -> Any:
    return make_request(("text", "BYTES", shape), raw=[blob])


MALFORMED = {
    "no inputs": (make_request(), "request has no inputs"),
    "raw count below inputs": (
        make_request(("a", "FP32", [4]), ("b", "FP32", [4]), raw=[FOUR_FLOATS]),
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    "raw count above inputs": (
        make_request(("a", "FP32", [4]), raw=[FOUR_FLOATS, FOUR_FLOATS]),
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    "raw mixed with typed": (_mixed(), "'b' have typed contents .* also has raw_input_contents"),
    "raw too short": (
        make_request(("input", "FP32", [2, 4]), raw=[FOUR_FLOATS]),
        r"input 'input': shape \[2, 4\] of FP32 needs 32 bytes, raw_input_contents\[0\] has 16",
    ),
    "raw too long": (
        make_request(("input", "INT64", [1]), raw=[b"\0" * 9]),
        "input 'input': .* needs 8 bytes, .* has 9",
    ),
    "unknown datatype": (
        make_request(("input", "FLOAT32", [4]), raw=[FOUR_FLOATS]),
        "input 'input': unknown datatype 'FLOAT32'; expected one of BOOL, ",
    ),
    "negative dimension": (
        make_request(("input", "FP32", [-1, 4]), raw=[FOUR_FLOATS]),
        "input 'input': shape .* negative dimension",
    ),
    "empty name": (make_request(("", "FP32", [4]), raw=[FOUR_FLOATS]), r"inputs\[0\]: 'name'"),
    "no data": (make_request(("input", "FP32", [4])), "input 'input': no data"),
    "typed wrong field": (
        _typed("FP32", "int64_contents", [1, 2, 3, 4], [4]),
        "input 'x': FP32 data goes in contents.fp32_contents, not int64_contents",
    ),
    "typed count mismatch": (
        _typed("INT64", "int64_contents", [1, 2, 3], [2, 2]),
        r"input 'x': shape \[2, 2\] needs 4 elements, contents.int64_contents has 3",
    ),
    "typed FP16": (
        _typed("FP16", "fp32_contents", [1.0], [1]),
        "input 'x': FP16 has no typed contents field; send it in raw_input_contents",
    ),
    "typed INT8 overflow": (
        _typed("INT8", "int_contents", [300], [1]),
        "input 'x': contents.int_contents does not fit INT8",
    ),
    "bytes truncated length": (_bytes_raw(b"\x01\x00", [1]), "truncated BYTES element length"),
    "bytes element overruns": (
        _bytes_raw(struct.pack("<I", 10) + b"abc", [1]),
        "input 'text': BYTES element of 10 bytes at byte 4 runs past the end",
    ),
    "bytes count mismatch": (
        _bytes_raw(struct.pack("<I", 1) + b"a", [2]),
        r"input 'text': shape \[2\] needs 2 BYTES elements, raw_input_contents\[0\] has 1",
    ),
    "parameter without value": (_empty_parameter(), "request: parameter 'timeout' has no value"),
    "input in shared memory": (
        _with_input_param("shared_memory_region"),
        "input 'x': shared memory .* not supported",
    ),
    "output in shared memory": (
        _with_output_param("shared_memory_byte_size", 16),
        "output 'probabilities': shared memory .* not supported",
    ),
    "classification output": (
        _with_output_param("classification", 2),
        "output 'probabilities': classification",
    ),
}


@pytest.mark.parametrize(("msg", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_says_what_is_wrong(msg: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(msg)


# -- responses -------------------------------------------------------------------------------


def test_response_is_raw_and_readable_by_tritonclient() -> None:
    probs = np.array([[0.1, 0.9], [0.7, 0.3]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int64)
    words = np.array([b"yes", "no"], dtype=np.object_)
    response = InferResponse(
        "iris",
        "1",
        [
            Tensor("label", "INT64", (2,), labels),
            Tensor("probabilities", "FP32", (2, 2), probs, {"normalized": True}),
            Tensor("names", "BYTES", (2,), words),
        ],
        id="req-1",
        parameters={"members_answered": "a@edge,b@cloud", "completeness": 1.0, "asked": 2},
    )
    msg = encode_infer_response(response)
    assert (msg.model_name, msg.model_version, msg.id) == ("iris", "1", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("label", "INT64", [2]),
        ("probabilities", "FP32", [2, 2]),
        ("names", "BYTES", [2]),
    ]
    assert all(not o.HasField("contents") for o in msg.outputs)
    assert len(msg.raw_output_contents) == 3
    assert msg.outputs[1].parameters["normalized"].bool_param is True
    assert params_from_proto(msg.parameters, "response") == response.parameters

    result = InferResult(msg)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert result.as_numpy("names").tolist() == [b"yes", b"no"]


def test_response_casts_data_to_the_declared_datatype() -> None:
    # The declared datatype is the contract with the client, whatever dtype the data has.
    response = InferResponse("m", "1", [Tensor("p", "FP32", (2,), np.array([0.5, 1.0]))])
    msg = encode_infer_response(response)
    assert msg.raw_output_contents[0] == np.array([0.5, 1.0], dtype="<f4").tobytes()
    assert msg.id == ""


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [([1] * 65, "at most 64"), ([0, 2**62], "cannot be allocated"), ([2**63 - 1, 0], "allocated")],
)
def test_shapes_numpy_cannot_hold_are_invalid(shape: list[int], fragment: str) -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name="x", datatype="FP32")
    tensor.shape.extend(shape)
    with pytest.raises(InvalidInput, match=fragment):
        decode_infer_request(req)
