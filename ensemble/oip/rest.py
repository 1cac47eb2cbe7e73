"""OIP REST bodies to and from internal requests: JSON tensors and the binary tensor extension."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from ensemble.errors import InvalidInput, clip
from ensemble.oip.checks import check_elements, check_id
from ensemble.oip.datatypes import (
    OIP_TO_NUMPY,
    check_rank,
    numpy_to_oip,
    reshape,
    split_bytes_elements,
    to_wire,
)
from ensemble.types import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor

HEADER_LENGTH = "inference-header-content-length"
_JSON_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY


def _param_dict(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: 'parameters' must be a JSON object")
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidInput(
                f"{where}: parameter {clip(key)!r} must be a boolean, number or string"
            )
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    shape = tuple(value)
    check_rank(shape, where)
    return shape


def _tensor_from_json(
    datatype: str, shape: tuple[int, ...], data: Any, where: str, may_hold_bools: bool = True
) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a JSON array")
    found = _leaf_count(data)
    if found != count:  # before converting anything: a wrong count costs no more work
        raise InvalidInput(f"{where}: shape {list(shape)} needs {count} elements, data has {found}")
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=np.object_).ravel()
            if not all(isinstance(x, str) for x in flat):
                raise InvalidInput(f"{where}: BYTES data must be strings")
            array = np.array([x.encode() for x in flat], dtype=np.object_)
        else:
            if datatype == "BOOL":
                if not all(isinstance(x, bool) for x in np.asarray(data, np.object_).ravel()):
                    raise InvalidInput(f"{where}: BOOL data must be true or false")
            elif not _only_numbers(data, may_hold_bools):
                raise InvalidInput(f"{where}: {datatype} data must be numbers")
            with np.errstate(over="raise"):  # 1e39 as FP32 is an error, not a silent inf
                array = np.asarray(data, dtype=OIP_TO_NUMPY[datatype]).ravel()
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise InvalidInput(f"{where}: data does not fit datatype {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidInput(
            f"{where}: shape {list(shape)} needs {count} elements, data has {array.size}"
        )
    return reshape(array, shape, where)


def _leaf_count(data: list[Any]) -> int:
    """Elements of a (possibly nested) JSON array, counting only the lists' lengths: a list
    whose first item is no list is taken as a row of values (numpy finds ragged ones)."""
    if not data or not isinstance(data[0], list):
        return len(data)
    return sum(_leaf_count(item) if isinstance(item, list) else 1 for item in data)


def _only_numbers(data: list[Any], may_hold_bools: bool) -> bool:
    """Whether a nested list holds only ints and floats. numpy infers a numeric dtype only from
    numbers (and bools, which only a body with a `true` or `false` can hold) in about a tenth of
    the time a Python walk takes; anything else is walked."""
    try:
        kind = np.asarray(data).dtype.kind
    except (ValueError, TypeError):  # ragged: the walk decides, conversion reports the shape
        kind = "O"
    if kind in "iuf" and not may_hold_bools:
        return True
    return not _contains_non_number(data)


def _may_hold_bools(body: bytes, end: int) -> bool:
    """Whether the JSON text ``body[:end]`` may hold a boolean: a byte search for the literals."""
    return body.find(b"true", 0, end) >= 0 or body.find(b"false", 0, end) >= 0


def _contains_non_number(data: list[Any]) -> bool:
    """True when a nested list holds anything but ints and floats (bools and strings included)."""
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            return True
    return False


def _tensor_from_binary(
    datatype: str, shape: tuple[int, ...], chunk: memoryview, where: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = split_bytes_elements(chunk, where)
        if len(elements) != count:
            raise InvalidInput(
                f"{where}: shape {list(shape)} needs {count} elements, data has {len(elements)}"
            )
        return reshape(np.array(elements, dtype=np.object_), shape, where)
    dtype = OIP_TO_NUMPY[datatype].newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"binary data has {len(chunk)}"
        )
    return reshape(np.frombuffer(chunk, dtype=dtype), shape, where)


def _json_end(body: bytes, header_length: str | None) -> int:
    """Where the JSON header ends: ``Inference-Header-Content-Length``, else the whole body."""
    if header_length is None:
        return len(body)
    try:
        json_end = int(header_length)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 < json_end <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {json_end} is outside the body of {len(body)} bytes"
        )
    return json_end


def may_set_priority(body: bytes, header_length: str | None) -> bool:
    """Whether the JSON part of a request body might set the ``priority`` parameter: a byte
    search, no parsing. False only when it certainly does not (no "priority" and no escape
    that could spell it), so the request has the default priority."""
    end = len(body)
    if header_length is not None and header_length.isdigit():
        end = min(end, int(header_length))
    return body.find(b"priority", 0, end) >= 0 or body.find(b"\\u", 0, end) >= 0


def _decode_tensors(
    raw_tensors: list[Any],
    binary: memoryview,
    noun: str,
    max_elements: int | None = None,
    may_hold_bools: bool = True,
) -> list[Tensor]:
    """The ``inputs`` (or ``outputs``) of a body: JSON data or slices of the binary part;
    shapes holding more than ``max_elements`` in all are refused before any data is read."""
    offset = 0
    elements = 0
    tensors: list[Tensor] = []
    for i, raw in enumerate(raw_tensors):
        where = f"{noun}s[{i}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where} must be a JSON object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}: 'name' must be a non-empty string")
        where = f"{noun} {clip(name)!r}"
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
            raise InvalidInput(
                f"{where}: unknown datatype {clip(str(datatype))!r}; "
                f"expected one of {', '.join(OIP_TO_NUMPY)}"
            )
        shape = _shape(raw.get("shape"), where)
        if max_elements is not None:
            elements += math.prod(shape)
            check_elements(elements, max_elements, where)
        params = _param_dict(raw.get("parameters"), where)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise InvalidInput(f"{where}: has both 'data' and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            data = _tensor_from_binary(datatype, shape, binary[offset : offset + size], where)
            offset += size
            params = {k: v for k, v in params.items() if k != "binary_data_size"}
        elif "data" in raw:
            data = _tensor_from_json(datatype, shape, raw["data"], where, may_hold_bools)
        else:
            raise InvalidInput(f"{where}: needs 'data' or parameters.binary_data_size")
        tensors.append(Tensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise InvalidInput(
            f"binary data is {len(binary)} bytes but {noun}s declare {offset} "
            "(check Inference-Header-Content-Length and binary_data_size)"
        )
    return tensors


def decode_infer_request(
    body: bytes,
    header_length: str | None,
    model_name: str,
    model_version: str | None,
    max_elements: int | None = None,
) -> InferRequest:
    """Parse an infer request body; every defect raises InvalidInput naming what is wrong,
    and shapes holding more than ``max_elements`` in all raise PayloadTooLarge."""
    json_end = _json_end(body, header_length)
    try:
        doc = orjson.loads(body[:json_end])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None:
        check_id(request_id)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    inputs = _decode_tensors(
        raw_inputs,
        memoryview(body)[json_end:],
        "input",
        max_elements,
        _may_hold_bools(body, json_end),
    )

    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
            oparams = _param_dict(raw.get("parameters"), f"output {clip(raw['name'])!r}")
            wants = oparams.get("binary_data")
            if wants is not None and not isinstance(wants, bool):
                raise InvalidInput(
                    f"output {clip(raw['name'])!r}: binary_data must be true or false"
                )
            outputs.append(RequestedOutput(raw["name"], wants))
    parameters = _param_dict(doc.get("parameters"), "request")
    return InferRequest(model_name, model_version, inputs, request_id, outputs, parameters)


def _json_data(tensor: Tensor) -> Any:
    flat = tensor.data.ravel()
    if tensor.datatype == "BYTES":
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    return flat


def encode_infer_response(
    response: InferResponse, request: InferRequest
) -> tuple[bytes, int | None]:
    """Serialise a response; returns the body and the JSON header length when binary follows."""
    default_binary = request.parameters.get("binary_data_output") is True
    wanted = {o.name: o.binary for o in request.outputs or ()}
    outputs_json = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        choice = wanted.get(tensor.name)
        if choice if choice is not None else default_binary:
            blob = to_wire(tensor.datatype, tensor.data)
            entry["parameters"] = {**tensor.parameters, "binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if tensor.parameters:
                entry["parameters"] = tensor.parameters
            entry["data"] = _json_data(tensor)
        outputs_json.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs_json,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=_JSON_DUMPS_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def dumps(doc: Any) -> bytes:
    """JSON-encode a metadata or error document."""
    return orjson.dumps(doc, option=_JSON_DUMPS_OPTS)


# -- the client side (the oip-http backend): requests out, responses in ---------------------


def encode_request_body(
    feed: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    parameters: Mapping[str, int] | None = None,
) -> tuple[bytes, int]:
    """An infer request with every input as binary data and ``outputs`` asked for as binary
    (and request ``parameters`` when any); the body and its JSON header's length
    (``Inference-Header-Content-Length``)."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in feed.items():
        datatype = numpy_to_oip(array.dtype)
        blob = to_wire(datatype, array)
        inputs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    wanted = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    doc: dict[str, Any] = {"inputs": inputs, "outputs": wanted}
    if parameters:
        doc["parameters"] = dict(parameters)
    header = orjson.dumps(doc)
    return b"".join([header, *blobs]), len(header)


def decode_response_body(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """The outputs of an infer response, binary or JSON; InvalidInput names any defect."""
    json_end = _json_end(body, header_length)
    try:
        doc = orjson.loads(body[:json_end])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in response body: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise InvalidInput("response body must be a JSON object with a list of 'outputs'")
    tensors = _decode_tensors(doc["outputs"], memoryview(body)[json_end:], "output")
    return {t.name: t.data for t in tensors}


def error_message(body: bytes) -> str:
    """The message of an OIP error body ``{"error": "..."}``, else the body's start."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return body[:200].decode("utf-8", errors="replace") or "(empty body)"
