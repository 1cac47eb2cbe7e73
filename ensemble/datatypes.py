"""OIP tensor datatypes: their numpy dtypes, element sizes and onnxruntime type names."""

from __future__ import annotations

from typing import Final

import numpy as np

OIP_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
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
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_OIP: Final[dict[np.dtype[np.generic], str]] = {
    dt: name for name, dt in OIP_TO_NUMPY.items() if name != "BYTES"
}

ORT_TO_OIP: Final[dict[str, str]] = {
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


def oip_datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array (object/str/bytes arrays are BYTES)."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[array.dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element in the binary tensor encoding (0 for variable-length BYTES)."""
    if datatype == "BYTES":
        return 0
    return OIP_TO_NUMPY[datatype].itemsize
