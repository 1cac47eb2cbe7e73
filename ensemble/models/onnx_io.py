"""Translate ONNX tensor types to OIP datatypes and numpy dtypes, and read a model's I/O specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ensemble.models.card import OipDatatype, TensorSpec

ORT_TO_OIP: dict[str, OipDatatype] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
"""onnxruntime type strings (``NodeArg.type``) to OIP datatype names."""

OIP_TO_NUMPY: dict[OipDatatype, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # onnxruntime takes and returns string tensors as object arrays.
    "BYTES": np.dtype(np.object_),
}
"""OIP datatype names to the numpy dtype onnxruntime uses for them."""

NUMPY_TO_OIP: dict[np.dtype[Any], OipDatatype] = {
    dtype: datatype for datatype, dtype in OIP_TO_NUMPY.items()
}
"""Fixed-size numpy dtypes to OIP datatype names; use :func:`numpy_to_oip` for string arrays."""


def numpy_to_oip(dtype: np.dtype[Any]) -> OipDatatype:
    """Return the OIP datatype for a numpy dtype, mapping any bytes/str/object dtype to BYTES."""
    # Bytes and str dtypes carry their item size ("S5", "<U3"), so they never hit the table.
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no OIP datatype") from None


def onnx_io_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read the input and output specs of an ONNX model file through onnxruntime."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session_io_specs(session)


def session_io_specs(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read the input and output specs of an open onnxruntime session."""
    inputs = [_tensor_spec(arg) for arg in session.get_inputs()]
    outputs = [_tensor_spec(arg) for arg in session.get_outputs()]
    return inputs, outputs


def _tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    ort_type = str(arg.type)
    try:
        datatype = ORT_TO_OIP[ort_type]
    except KeyError:
        raise ValueError(
            f"tensor {arg.name!r} has type {ort_type}, which OIP cannot carry"
        ) from None
    # Symbolic dimensions come back as strings and unknown ones as None: both are dynamic.
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape]
    return TensorSpec(name=str(arg.name), datatype=datatype, shape=shape)
