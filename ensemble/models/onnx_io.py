"""Read an ONNX model's input and output specs as OIP tensor specs (for member cards)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import onnxruntime as ort

from ensemble.models.card import OipDatatype, TensorSpec
from ensemble.oip.datatypes import NUMPY_TO_OIP, OIP_TO_NUMPY, ORT_TO_OIP, numpy_to_oip


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
        datatype = cast(OipDatatype, ORT_TO_OIP[ort_type])
    except KeyError:
        raise ValueError(
            f"tensor {arg.name!r} has type {ort_type}, which OIP cannot carry"
        ) from None
    # Symbolic dimensions come back as strings and unknown ones as None: both are dynamic.
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape]
    return TensorSpec(name=str(arg.name), datatype=datatype, shape=shape)


__all__ = [
    "NUMPY_TO_OIP",
    "OIP_TO_NUMPY",
    "ORT_TO_OIP",
    "numpy_to_oip",
    "onnx_io_specs",
    "session_io_specs",
]
