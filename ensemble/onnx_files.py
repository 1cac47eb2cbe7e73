"""An ONNX model as the files it is stored in: the model file and the external data files its
tensors name (ONNX keeps large weights beside the graph that way, a path relative to the model
file's folder per tensor), each read once. The model's digest covers all of them, and the
model handed to onnxruntime is made self-contained from those very bytes, so what was checked
is what is loaded, and no file is opened again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ensemble.errors import EnsembleError

MAX_EXTERNAL_FILES = 4096
"""External data files one model may name."""
PROTOBUF_LIMIT = 2**31 - 1
"""The largest model protobuf can hold in one message: a model whose tensors add up to more
cannot be made self-contained."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """A model file's bytes and those of the external data files it names."""

    path: Path
    model: bytes
    external: Mapping[str, bytes] = field(default_factory=dict)
    """Each external data file's bytes by its location (as the model names it), sorted."""

    def digest(self) -> str:
        """The model's SHA-256: the model file's, or with external data files the SHA-256 of
        the lines ``HEX`` (the model file's) then ``HEX  LOCATION`` per file in location order
        (what ``sha256sum`` prints for them), so no file can change unnoticed."""
        own = sha256_hex(self.model)
        if not self.external:
            return own
        lines = [own, *(f"{sha256_hex(data)}  {name}" for name, data in self.external.items())]
        return sha256_hex("".join(f"{line}\n" for line in lines).encode())

    def describe(self) -> str:
        """The files, as messages name them."""
        if not self.external:
            return f"model file {self.path}"
        names = ", ".join(self.external)
        return f"model file {self.path} with its external data ({names})"

    def self_contained(self) -> bytes:
        """The model with every external tensor's data in it (the model file's own bytes
        when it has none); EnsembleError when a tensor's data lies outside its file, or the
        whole exceeds what protobuf can hold."""
        if not self.external:
            return self.model
        model = onnx.load_model_from_string(self.model)
        total = len(self.model)
        for tensor in _external_tensors(model):
            info = ExternalDataInfo(tensor)
            data = self.external[info.location]
            offset = info.offset or 0
            length = len(data) - offset if info.length is None else info.length
            if offset < 0 or length < 0 or offset + length > len(data):
                raise EnsembleError(
                    f"model {self.path}: tensor {tensor.name!r} reads bytes {offset} to "
                    f"{offset + length} of {info.location!r}, which holds {len(data)}"
                )
            total += length
            if total > PROTOBUF_LIMIT:
                raise EnsembleError(
                    f"model {self.path}: its tensors hold over 2 GiB, more than one ONNX "
                    "protobuf can carry; models that large cannot be served yet"
                )
            tensor.raw_data = data[offset : offset + length]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        return model.SerializeToString()


def read_model_files(path: Path) -> ModelFiles:
    """Read ``path`` and the external data files it names (each once); EnsembleError naming
    the file when one cannot be read, or a location is not a file inside the model's folder."""
    try:
        model = path.read_bytes()
    except OSError as exc:
        raise EnsembleError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    # Tensors kept outside say so with a `location` entry: without those bytes there are none,
    # and the model need not be parsed here.
    if b"location" not in model:
        return ModelFiles(path, model)
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf's DecodeError, or onnx's own
        raise EnsembleError(f"{path} is not an ONNX model: {exc}") from exc
    locations = sorted({ExternalDataInfo(t).location for t in _external_tensors(proto)})
    if len(locations) > MAX_EXTERNAL_FILES:
        raise EnsembleError(
            f"model {path} names {len(locations)} external data files; at most "
            f"{MAX_EXTERNAL_FILES} are read"
        )
    external = {name: _read_external(path, name) for name in locations}
    return ModelFiles(path, model, external)


def _read_external(path: Path, location: str) -> bytes:
    folder = path.parent.resolve()
    why = None
    if not location or any(
        p.is_absolute() or p.anchor or ".." in p.parts
        for p in (PurePosixPath(location), PureWindowsPath(location))
    ):
        why = "not a path inside the model's folder"
    else:
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            why = "a link out of the model's folder"
        elif not target.is_file():
            why = "missing" if not target.exists() else "not a regular file"
    if why is not None:
        raise EnsembleError(f"model {path}: external data file {location!r} is {why}")
    try:
        return target.read_bytes()
    except OSError as exc:
        raise EnsembleError(
            f"model {path}: cannot read external data file {location!r}: {exc.strerror or exc}"
        ) from exc


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model whose data is kept in an external file."""
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            yield tensor


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)
