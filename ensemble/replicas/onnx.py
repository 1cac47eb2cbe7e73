"""Loading ONNX models into onnxruntime sessions tuned for a small CPU machine."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ensemble.datatypes import ORT_TO_OIP
from ensemble.errors import EnsembleError
from ensemble.types import TensorSpec


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


def load_session(path: Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path``; a clear error when the file is not a model."""
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EnsembleError(f"cannot load ONNX model {path}: {exc}") from exc


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_OIP.get(arg.type)
    if datatype is None:
        raise EnsembleError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def session_io(
    session: ort.InferenceSession,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a session as OIP tensor specs (-1 for dynamic dimensions)."""
    return (
        tuple(_spec(a) for a in session.get_inputs()),
        tuple(_spec(a) for a in session.get_outputs()),
    )
