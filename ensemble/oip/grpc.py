"""OIP gRPC messages to and from internal requests: raw and typed tensor contents, parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
from tritonclient.grpc import service_pb2

from ensemble.errors import EnsembleError, InvalidInput, clip
from ensemble.oip.checks import check_elements, check_id
from ensemble.oip.datatypes import (
    OIP_TO_NUMPY,
    WIRE_DTYPES,
    check_rank,
    reshape,
    split_bytes_elements,
    to_wire,
)
from ensemble.types import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor

# Which InferTensorContents field carries each datatype (as in Triton's grpc_service.proto).
# FP16 has no typed field: it can only travel in raw_input_contents.
TYPED_FIELDS: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1

# Triton parameters saying the data lives in a shared-memory region, which this gateway lacks;
# without this check such a request would fail later with a confusing "no data" message.
_SHARED_MEMORY_PARAMS: Final = ("shared_memory_region", "shared_memory_byte_size")


# -- parameters ------------------------------------------------------------------------------


def params_from_proto(params: Mapping[str, Any], where: str) -> Parameters:
    """A protobuf ``map<string, InferParameter>`` as a Parameters dict."""
    out: Parameters = {}
    if not params:  # the common case; skips building a protobuf map iterator per tensor
        return out
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"{where}: parameter {clip(key)!r} has no value")
        out[key] = getattr(param, choice)
    return out


def params_to_proto(params: Parameters, target: Any) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` from a Parameters dict."""
    for key, value in params.items():
        param = target[key]
        # bool first: it is a subclass of int.
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if _INT64_MIN <= value <= _INT64_MAX:
                param.int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                param.uint64_param = value
            else:
                raise EnsembleError(f"parameter {key!r} = {value} does not fit in 64 bits")
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value


# -- tensors ---------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return str(list(shape))


def _bytes_array(elements: Sequence[bytes], shape: tuple[int, ...], where: str) -> np.ndarray:
    return reshape(np.array(elements, dtype=np.object_), shape, where)


def tensor_from_raw(
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    blob: bytes,
    index: int,
    where: str,
    field: str = "raw_input_contents",
) -> np.ndarray:
    """One tensor from its raw contents (``field[index]``); InvalidInput when they do not fit."""
    if datatype == "BYTES":
        elements = split_bytes_elements(blob, where)
        if len(elements) != count:
            raise InvalidInput(
                f"{where}: shape {_shape_text(shape)} needs {count} BYTES elements, "
                f"{field}[{index}] has {len(elements)}"
            )
        return _bytes_array(elements, shape, where)
    dtype = WIRE_DTYPES[datatype]
    need = count * dtype.itemsize
    if len(blob) != need:
        raise InvalidInput(
            f"{where}: shape {_shape_text(shape)} of {datatype} needs {need} bytes, "
            f"{field}[{index}] has {len(blob)}"
        )
    return reshape(np.frombuffer(blob, dtype=dtype), shape, where)


def tensor_from_contents(
    datatype: str, shape: tuple[int, ...], count: int, contents: Any, where: str
) -> np.ndarray:
    """One tensor from typed ``InferTensorContents``; InvalidInput when they do not fit."""
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"{where}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    others = [desc.name for desc, _ in contents.ListFields() if desc.name != field]
    if others:
        raise InvalidInput(
            f"{where}: {datatype} data goes in contents.{field}, not {', '.join(others)}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: shape {_shape_text(shape)} needs {count} elements, "
            f"contents.{field} has {len(values)}"
        )
    if datatype == "BYTES":
        return _bytes_array(list(values), shape, where)
    try:
        # int_contents carries INT8/INT16 as int32: numpy refuses values that do not fit.
        return reshape(np.array(values, dtype=OIP_TO_NUMPY[datatype]), shape, where)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"{where}: contents.{field} does not fit {datatype}: {exc}") from None


def _check_no_shared_memory(params: Parameters, where: str) -> None:
    for key in _SHARED_MEMORY_PARAMS:
        if key in params:
            raise InvalidInput(f"{where}: shared memory ({key}) is not supported; send the data")


def _input_tensor(inp: Any, raw: Sequence[bytes], index: int) -> Tensor:
    name: str = inp.name
    if not name:
        raise InvalidInput(f"inputs[{index}]: 'name' must be a non-empty string")
    where = f"input {clip(name)!r}"
    datatype: str = inp.datatype
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInput(
            f"{where}: unknown datatype {clip(datatype)!r}; "
            f"expected one of {', '.join(OIP_TO_NUMPY)}"
        )
    shape = tuple(inp.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {_shape_text(shape)} has a negative dimension")
    check_rank(shape, where)
    params = params_from_proto(inp.parameters, where)
    _check_no_shared_memory(params, where)
    count = math.prod(shape)
    if raw:
        data = tensor_from_raw(datatype, shape, count, raw[index], index, where)
    elif inp.HasField("contents"):
        data = tensor_from_contents(datatype, shape, count, inp.contents, where)
    elif count == 0:
        dtype = np.dtype(np.object_) if datatype == "BYTES" else WIRE_DTYPES[datatype]
        data = reshape(np.empty(0, dtype), shape, where)
    else:
        raise InvalidInput(f"{where}: no data; send raw_input_contents or contents")
    return Tensor(name, datatype, shape, data, params)


def _requested_output(out: Any, index: int) -> RequestedOutput:
    name: str = out.name
    if not name:
        raise InvalidInput(f"outputs[{index}]: 'name' must be a non-empty string")
    where = f"output {clip(name)!r}"
    params = params_from_proto(out.parameters, where)
    _check_no_shared_memory(params, where)
    # Triton's top-k classification rewrites the output; answering with the plain tensor would
    # hand the client data of a shape it did not ask for.
    if params.get("classification", 0):
        raise InvalidInput(f"{where}: classification (class_count) is not supported")
    return RequestedOutput(name)


def decode_infer_request(msg: Any, max_elements: int | None = None) -> InferRequest:
    """A ModelInferRequest as an InferRequest; every defect raises InvalidInput saying what,
    and shapes holding more than ``max_elements`` in all raise PayloadTooLarge."""
    inputs_pb = msg.inputs
    if not inputs_pb:
        raise InvalidInput("request has no inputs")
    raw: Sequence[bytes] = msg.raw_input_contents
    if raw:
        if len(raw) != len(inputs_pb):
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {len(inputs_pb)} inputs; "
                "send one per input, in order"
            )
        mixed = [inp.name for inp in inputs_pb if inp.HasField("contents")]
        if mixed:
            raise InvalidInput(
                f"input(s) {', '.join(repr(clip(n)) for n in mixed)} have typed contents while "
                "the request also has raw_input_contents; use one or the other"
            )
    if msg.id:
        check_id(msg.id)
    if max_elements is not None:  # every shape, before any data is read
        total = 0
        for inp in inputs_pb:
            total += math.prod(inp.shape)
            check_elements(total, max_elements, f"input {clip(inp.name)!r}")
    inputs = [_input_tensor(inp, raw, i) for i, inp in enumerate(inputs_pb)]
    outputs = [_requested_output(out, i) for i, out in enumerate(msg.outputs)] or None
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version or None,
        inputs=inputs,
        id=msg.id or None,
        outputs=outputs,
        parameters=params_from_proto(msg.parameters, "request"),
    )


def encode_infer_response(response: InferResponse) -> Any:
    """An InferResponse as a ModelInferResponse; tensor data always in raw_output_contents."""
    msg = service_pb2.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
    )
    for tensor in response.outputs:
        out = msg.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.parameters:
            params_to_proto(tensor.parameters, out.parameters)
    msg.raw_output_contents.extend([to_wire(t.datatype, t.data) for t in response.outputs])
    params_to_proto(response.parameters, msg.parameters)
    return msg


# -- the client side (the oip-grpc backend): responses in ------------------------------------


def decode_infer_response(msg: Any) -> dict[str, np.ndarray]:
    """The outputs of a ModelInferResponse, raw or typed; InvalidInput names any defect."""
    raw: Sequence[bytes] = msg.raw_output_contents
    if raw and len(raw) != len(msg.outputs):
        raise InvalidInput(
            f"raw_output_contents has {len(raw)} entries for {len(msg.outputs)} outputs"
        )
    result: dict[str, np.ndarray] = {}
    for i, out in enumerate(msg.outputs):
        where = f"output {clip(out.name)!r}"
        if out.datatype not in OIP_TO_NUMPY:
            raise InvalidInput(f"{where}: unknown datatype {clip(out.datatype)!r}")
        shape = tuple(out.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"{where}: shape {_shape_text(shape)} has a negative dimension")
        check_rank(shape, where)
        count = math.prod(shape)
        if raw:
            data = tensor_from_raw(
                out.datatype, shape, count, raw[i], i, where, "raw_output_contents"
            )
        else:
            data = tensor_from_contents(out.datatype, shape, count, out.contents, where)
        result[out.name] = data
    return result
