"""OIP tensor datatypes: their numpy dtypes, element sizes and onnxruntime type names."""

from __future__ import annotations

import struct
from typing import Any, Final

import numpy as np

from ensemble.errors import InvalidInput

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

WIRE_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    name: dtype.newbyteorder("<") for name, dtype in OIP_TO_NUMPY.items() if name != "BYTES"
}
"""The wire format is little-endian whatever the host is; on little-endian hosts these equal
the native dtypes, so ``np.frombuffer`` / ``np.asarray`` with them neither swap nor copy."""

NUMPY_TO_OIP: Final[dict[np.dtype[np.generic], str]] = {
    dt: name for name, dt in OIP_TO_NUMPY.items()
}
"""Fixed-size numpy dtypes (and object, for BYTES) to OIP names; see :func:`numpy_to_oip`."""

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


def numpy_to_oip(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype; any bytes, str or object dtype is BYTES."""
    # Bytes and str dtypes carry their item size ("S5", "<U3"), so they never hit the table.
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no OIP datatype") from None


def split_bytes_elements(blob: bytes | memoryview, where: str) -> list[bytes]:
    """BYTES tensors in raw form: each element is a 4-byte little-endian length, then the data."""
    out: list[bytes] = []
    offset = 0
    end = len(blob)
    unpack = struct.Struct("<I").unpack_from
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"{where}: truncated BYTES element length at byte {offset}")
        (length,) = unpack(blob, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{where}: BYTES element of {length} bytes at byte {offset} runs past the end "
                f"of the {end}-byte raw contents"
            )
        out.append(bytes(blob[offset : offset + length]))
        offset += length
    return out


def join_bytes_elements(array: np.ndarray) -> bytes:
    """The raw form of a BYTES tensor (str elements are sent UTF-8 encoded)."""
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def to_wire(datatype: str, array: np.ndarray) -> bytes:
    """A tensor's raw form on the wire (binary extension, gRPC raw contents): little-endian and
    row-major, BYTES elements length-prefixed; no copy beyond ``tobytes`` in the usual case."""
    if datatype == "BYTES":
        return join_bytes_elements(array)
    return np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype]).tobytes()


MAX_RANK: Final = 64
"""numpy's limit on dimensions (NPY_MAXDIMS); no model input comes anywhere near it."""


def check_rank(shape: tuple[int, ...], where: str) -> None:
    """InvalidInput for more dimensions than numpy (and so any model) can hold."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{where}: shape has {len(shape)} dimensions; at most {MAX_RANK}")


def reshape(array: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """``array`` in ``shape``; InvalidInput when numpy cannot represent the shape.

    With a zero dimension the element count matches, yet numpy still refuses shapes whose
    dimensions multiply past its index range (e.g. [0, 2**62]).
    """
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise InvalidInput(f"{where}: shape {list(shape)} cannot be allocated: {exc}") from None
