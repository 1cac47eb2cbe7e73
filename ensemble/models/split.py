"""Splitting an ONNX model in two at one tensor: a head that runs on the edge and a tail that
runs in the cloud (Neurosurgeon's partition, Kang et al., ASPLOS'17), and the tensors a model
can be cut at.

A cut is a tensor that alone carries everything later nodes need from the earlier ones: the
head computes it from the model's inputs, the tail computes the model's outputs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import shape_inference, utils

from ensemble.oip.datatypes import OIP_TO_NUMPY, ORT_TO_OIP, numpy_to_oip


@dataclass(frozen=True, slots=True)
class CutPoint:
    """A tensor the model can be split at: its name, where it comes in the graph (the index of
    the node that makes it), its datatype and the bytes one batch row of it takes (None when
    its shape is not known past the batch dimension)."""

    tensor: str
    after_node: int
    datatype: str
    bytes_per_row: int | None


def cut_points(model: onnx.ModelProto, *, measure: bool = True) -> list[CutPoint]:
    """Every tensor, in graph order, that alone separates the model's inputs from its outputs
    (not a graph input or output itself, no initializer), and whose type shape inference
    knows (the tail takes it as its input). ``measure``: run the model once on a row of zeros
    for the sizes shape inference cannot tell (else they stay None)."""
    graph = shape_inference.infer_shapes(model).graph
    constants = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    types = {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}
    nodes = list(graph.node)
    # For each tensor, the last node that reads it.
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = i
    live = {i.name for i in graph.input if i.name not in constants}
    cuts = []
    for i, node in enumerate(nodes):
        live |= {name for name in node.output if name}
        # Tensors made so far that a later node still reads, or that the model returns.
        crossing = {t for t in live if last_use.get(t, -1) > i or t in outputs}
        live = crossing
        if len(crossing) == 1:
            (tensor,) = crossing
            if tensor not in outputs and tensor in types:
                cuts.append(_cut(tensor, i, types[tensor]))
    if measure and any(c.bytes_per_row is None for c in cuts):
        cuts = _measured(model, cuts)
    return cuts


def _measured(model: onnx.ModelProto, cuts: list[CutPoint]) -> list[CutPoint]:
    """The cuts with the bytes one row of each takes, from one run of the model on a row of
    zeros (shape inference cannot see through some operators, e.g. ai.onnx.ml's)."""
    import numpy as np
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for cut in cuts:
        if cut.tensor not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=cut.tensor))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {}
    for arg in session.get_inputs():
        shape = [1] + [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape[1:]]
        dtype = OIP_TO_NUMPY[ORT_TO_OIP[arg.type]]
        feed[arg.name] = np.zeros(shape, dtype=dtype)
    values = session.run([c.tensor for c in cuts], feed)
    return [
        CutPoint(c.tensor, c.after_node, c.datatype, int(np.asarray(v).nbytes))
        for c, v in zip(cuts, values, strict=True)
    ]


def _cut(tensor: str, index: int, kind: onnx.TypeProto) -> CutPoint:
    elem = kind.tensor_type.elem_type
    datatype = (
        "BYTES"
        if elem == onnx.TensorProto.STRING
        else numpy_to_oip(onnx.helper.tensor_dtype_to_np_dtype(elem))
    )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.tensor_type.shape.dim]
    size = None
    if dims and all(d is not None for d in dims[1:]) and datatype != "BYTES":
        itemsize = OIP_TO_NUMPY[datatype].itemsize
        size = math.prod(d for d in dims[1:] if d is not None) * itemsize
    return CutPoint(tensor, index, datatype, size)


def split(model: onnx.ModelProto, tensor: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The head (the model's inputs -> ``tensor``) and the tail (``tensor`` -> the model's
    outputs). ValueError when ``tensor`` is no cut point of the model."""
    known = {c.tensor for c in cut_points(model, measure=False)}
    if tensor not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"cannot split at {tensor!r}: not a cut point (cut points: {listed})")
    inferred = shape_inference.infer_shapes(model)
    extractor = utils.Extractor(inferred)
    inputs = [i.name for i in inferred.graph.input if i.name not in _constants(inferred)]
    outputs = [o.name for o in inferred.graph.output]
    head = extractor.extract_model(inputs, [tensor])
    tail = extractor.extract_model([tensor], outputs)
    return head, tail


def _constants(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}
