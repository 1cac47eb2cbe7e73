"""An ONNX model as the files it is stored in: the model file and the external data files its
tensors name (ONNX keeps large weights beside the graph that way: a path relative to the model
file's folder, an offset and a length per tensor), each read once. The model's digest covers
all of them, and the model handed to onnxruntime is made self-contained from those very bytes,
so what was checked is what is loaded, and no file is opened again.

A model file is untrusted until its digest is checked, and that needs its external files read:
so a location must be a relative path that stays in the model's folder (as onnxruntime asks),
each file is opened once without blocking and read only when it is a regular file, all of them
together within what one model may hold, and every offset and length must be a byte count
inside its file; anything else is an EnsembleError naming the tensor or the file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import Message

from ensemble.errors import EnsembleError

MAX_EXTERNAL_FILES = 4096
"""External data files one model may name."""
PROTOBUF_LIMIT = 2**31 - 1
"""The largest model protobuf can hold in one message: a model whose files add up to more
cannot be made self-contained."""
_EXTERNAL = onnx.TensorProto.EXTERNAL


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class _Slice:
    """Where one tensor's data lies: its file (by normalised location), offset, length."""

    tensor: onnx.TensorProto
    location: str
    offset: int
    length: int | None


@dataclass(frozen=True)
class ModelFiles:
    """A model file's bytes and those of the external data files it names."""

    path: Path
    model: bytes
    external: Mapping[str, bytes] = field(default_factory=dict)
    """Each external data file's bytes by its location (normalised: ``./w.bin`` is
    ``w.bin``), sorted."""

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
        when it has none)."""
        if not self.external:
            return self.model
        model = onnx.load_model_from_string(self.model)
        for part in _slices(model, self.path):
            data = self.external[part.location]
            end = len(data) if part.length is None else part.offset + part.length
            part.tensor.raw_data = data[part.offset : end]
            part.tensor.data_location = onnx.TensorProto.DEFAULT
            del part.tensor.external_data[:]
        return model.SerializeToString()


def read_model_files(path: Path) -> ModelFiles:
    """Read ``path`` and the external data files it names (each once); EnsembleError naming
    the file or the tensor when the model cannot be read so."""
    try:
        model = path.read_bytes()
    except OSError as exc:
        raise EnsembleError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    # A tensor kept outside says so with a `location` entry: without those bytes there is none,
    # and the model need not be parsed here.
    if b"location" not in model:
        return ModelFiles(path, model)
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf's DecodeError, or onnx's own
        raise EnsembleError(f"{path} is not an ONNX model: {exc}") from exc
    slices = _slices(proto, path)
    locations = sorted({part.location for part in slices})
    if len(locations) > MAX_EXTERNAL_FILES:
        raise EnsembleError(
            f"model {path} names {len(locations)} external data files; at most "
            f"{MAX_EXTERNAL_FILES} are read"
        )
    external = _read_all(path, locations, PROTOBUF_LIMIT - len(model))
    for part in slices:
        size = len(external[part.location])
        end = size if part.length is None else part.offset + part.length
        if part.offset > size or end > size:
            raise EnsembleError(
                f"model {path}: tensor {part.tensor.name[:80]!r} reads bytes {part.offset} to "
                f"{end} of {part.location!r}, which holds {size}"
            )
    return ModelFiles(path, model, external)


def _slices(model: onnx.ModelProto, path: Path) -> list[_Slice]:
    """Every tensor of ``model`` kept in an external file, with where its data lies."""
    found = []
    for tensor in _tensors(model):
        if tensor.data_location != _EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        name = tensor.name[:80]
        found.append(
            _Slice(
                tensor,
                _location(path, name, entries.get("location")),
                _count(path, name, "offset", entries.get("offset")) or 0,
                _count(path, name, "length", entries.get("length")),
            )
        )
    return found


def _location(path: Path, tensor: str, location: object) -> str:
    """A tensor's external data location, normalised; EnsembleError unless it is a relative
    path that stays in the model's folder."""
    if not isinstance(location, str) or not location or "\0" in location:
        why = "has no location" if not location else f"location {location!r:.80} is not a name"
        raise EnsembleError(f"model {path}: external tensor {tensor!r}: {why}")
    posix = PurePosixPath(location)
    if any(
        p.is_absolute() or p.anchor or ".." in p.parts for p in (posix, PureWindowsPath(location))
    ):
        raise EnsembleError(
            f"model {path}: external data file {location[:200]!r} of tensor {tensor!r} is not "
            "a path inside the model's folder"
        )
    return str(posix)


def _count(path: Path, tensor: str, key: str, value: object) -> int | None:
    """An offset or length in bytes (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 18:
        raise EnsembleError(
            f"model {path}: external tensor {tensor!r} has {key} {value!r:.40}, not a byte count"
        )
    return int(value)


def _read_all(path: Path, locations: list[str], budget: int) -> dict[str, bytes]:
    """Each external data file's bytes; the files together within ``budget`` bytes, checked
    from their sizes before any is read."""
    folder = path.parent
    total = 0
    for location in locations:
        try:
            info = os.stat(folder / location)
        except (OSError, ValueError) as exc:
            raise _unreadable(path, location, exc) from None
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, location)
        total += info.st_size
    if total > budget:
        raise _too_large(path)
    read: dict[tuple[int, int], bytes] = {}  # by file, for locations naming the same one
    external = {}
    for location in locations:
        external[location] = _read_one(path, location, read, budget)
        budget -= len(external[location])
    return external


def _read_one(path: Path, location: str, read: dict[tuple[int, int], bytes], budget: int) -> bytes:
    """One file, opened once without blocking (a FIFO put there since must not hang the
    gateway) and read from that descriptor only when it is a regular file."""
    try:
        fd = os.open(path.parent / location, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise _unreadable(path, location, exc) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, location)
        key = (info.st_dev, info.st_ino)
        if key in read:
            return read[key]
        try:
            data = file.read(budget + 1)
        except OSError as exc:
            raise _unreadable(path, location, exc) from None
        except MemoryError:
            raise _too_large(path) from None
    if len(data) > budget:
        raise _too_large(path)
    read[key] = data
    return data


def _unreadable(path: Path, location: str, exc: Exception) -> EnsembleError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return EnsembleError(f"model {path}: cannot read external data file {location[:200]!r}: {why}")


def _not_regular(path: Path, location: str) -> EnsembleError:
    return EnsembleError(
        f"model {path}: external data file {location[:200]!r} is not a regular file"
    )


def _too_large(path: Path) -> EnsembleError:
    return EnsembleError(
        f"model {path}: its files hold over 2 GiB, more than one ONNX protobuf can carry; "
        "models that large cannot be served yet"
    )


def _tensors(message: Message) -> Iterator[onnx.TensorProto]:
    """Every tensor anywhere in ``message``: initializers, node attributes, subgraphs,
    functions' bodies and attribute defaults, sparse tensors' parts."""
    for descriptor, value in message.ListFields():
        kind = descriptor.message_type
        if kind is None:  # not a message field
            continue
        if kind.GetOptions().map_entry:
            items = list(value.values())
        elif descriptor.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, onnx.TensorProto):
                yield item
            elif isinstance(item, Message):
                yield from _tensors(item)
