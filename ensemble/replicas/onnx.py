"""Loading ONNX models into onnxruntime sessions tuned for a small CPU machine, and their I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from ensemble.errors import EnsembleError
from ensemble.model_checks import graph_labels
from ensemble.oip.datatypes import ORT_TO_OIP
from ensemble.types import ClassLabel, TensorSpec


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """One thread per call: concurrency comes from the executor, not from inside a call."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the other core while idle; on 2 cores that costs more than it saves.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def load_session(
    path: Path, intra_op_threads: int = 1, model: bytes | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path``, or for ``model``, the bytes read from it (so
    the model loaded is the one whose digest was checked); a clear error when it is not a
    model."""
    try:
        return ort.InferenceSession(
            str(path) if model is None else model,
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EnsembleError(f"cannot load ONNX model {path}: {exc}") from exc


@dataclass(frozen=True)
class OnnxSignature:
    """A model's inputs and outputs as OIP sees them.

    scikit-learn exports (skl2onnx's default ZipMap) return class probabilities as a sequence
    of maps, which OIP cannot carry; such an output is presented as an FP32 [batch, classes]
    tensor of the same name and converted on every call, in class order ``map_outputs[name]``.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    map_outputs: Mapping[str, tuple[ClassLabel, ...]] = field(default_factory=dict)
    graph_classes: tuple[ClassLabel, ...] | None = None
    """Class labels declared by the graph's classifier or ZipMap node, if any."""


def _graph_labels(
    path: Path, data: bytes | None = None
) -> tuple[tuple[ClassLabel, ...] | None, dict[str, tuple[ClassLabel, ...]]]:
    """Class labels of the graph, and per ZipMap output name the labels of its map keys."""
    if data is None:
        model = onnx.load(str(path), load_external_data=False)
    else:
        model = onnx.load_model_from_string(data)
    return graph_labels(model)


def _dims(arg: ort.NodeArg) -> tuple[int, ...]:
    # Symbolic dimensions come back as strings and unknown ones as None: both are dynamic.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))


def read_signature(
    path: Path, session: ort.InferenceSession, model: bytes | None = None
) -> OnnxSignature:
    """Inputs and outputs of a loaded model (its graph read from ``model``, the bytes the
    session was loaded from, when given); unsupported inputs are an error, outputs skipped."""
    inputs = []
    for arg in session.get_inputs():
        datatype = ORT_TO_OIP.get(arg.type)
        if datatype is None:
            raise EnsembleError(
                f"{path}: input {arg.name!r} has type {arg.type}, OIP cannot carry it"
            )
        inputs.append(TensorSpec(arg.name, datatype, _dims(arg)))
    graph_classes, zipmaps = _graph_labels(path, model)
    outputs = []
    map_outputs: dict[str, tuple[ClassLabel, ...]] = {}
    for arg in session.get_outputs():
        datatype = ORT_TO_OIP.get(arg.type)
        if datatype is not None:
            outputs.append(TensorSpec(arg.name, datatype, _dims(arg)))
        elif arg.type.startswith("seq(map(") and arg.name in zipmaps:
            labels = zipmaps[arg.name]
            map_outputs[arg.name] = labels
            outputs.append(TensorSpec(arg.name, "FP32", (-1, len(labels))))
        # Any other non-tensor output is left out of the model's OIP signature.
    return OnnxSignature(tuple(inputs), tuple(outputs), map_outputs, graph_classes)
