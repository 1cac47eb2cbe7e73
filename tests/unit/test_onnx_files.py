"""Models with external data files (weights kept beside the graph), without sockets: read once
with the model file, covered by its digest, made self-contained from the bytes that were
checked; a location outside the model's folder, a missing or special file, a tensor past its
file's end refused with the reason."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from ensemble import onnx_files
from ensemble.cli import main
from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.integrity import Digest, model_digest, read_verified
from ensemble.onnx_files import read_model_files
from tests.helpers import save_with_external_data

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"
X = np.random.default_rng(5).uniform(0, 16, (3, 64)).astype(np.float32)


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return save_with_external_data(ZOO / "mlp_small.onnx", tmp_path / "mlp.onnx")


def probabilities(session: ort.InferenceSession) -> np.ndarray:
    result: np.ndarray = session.run(["probabilities"], {"input": X})[0]
    return result


def relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``path`` to ``location``."""
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def test_the_digest_covers_every_file_as_sha256sum_lists_them(model: Path) -> None:
    weights = model.parent / "weights.bin"
    files = read_model_files(model)
    assert list(files.external) == ["weights.bin"]
    manifest = f"{hexdigest(model.read_bytes())}\n{hexdigest(weights.read_bytes())}  weights.bin\n"
    assert files.digest() == model_digest(model) == hexdigest(manifest.encode())
    assert "with its external data (weights.bin)" in files.describe()
    plain = read_model_files(ZOO / "logreg.onnx")  # no external data: the file's own digest
    assert plain.external == {} and plain.digest() == hexdigest((ZOO / "logreg.onnx").read_bytes())


def test_the_checked_bytes_load_and_answer_as_the_files_do(model: Path) -> None:
    data = read_verified("mlp", model, [Digest(model_digest(model), "its pin")])
    assert b"weights.bin" not in data  # self-contained: onnxruntime opens no file
    from_bytes = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    from_files = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert np.array_equal(probabilities(from_bytes), probabilities(from_files))
    with pytest.raises(Exception, match="escapes working directory"):  # what it fixes
        ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])


def test_a_changed_weight_file_fails_the_digest(model: Path) -> None:
    pin = Digest(model_digest(model), "its pin")
    weights = model.parent / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"with its external data \(weights.bin\)"):
        read_verified("mlp", model, [pin])


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../weights.bin", "not a path inside the model's folder"),
        ("/etc/hostname", "not a path inside the model's folder"),
        ("sub/../../weights.bin", "not a path inside the model's folder"),
        ("C:weights.bin", "not a path inside the model's folder"),
        ("absent.bin", "cannot read external data file 'absent.bin'"),
        ("loop", "cannot read external data file 'loop'"),
        ("fifo", "not a regular file"),
        ("folder", "not a regular file"),
        ("x" * 300, "cannot read external data file"),
        ("nul\0.bin", "is not a name"),
        ("", "has no location"),
    ],
)
def test_a_location_outside_the_folder_or_not_a_file_is_refused(
    model: Path, tmp_path: Path, location: str, reason: str
) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opened without blocking, and refused
    relocate(model, location.replace("\\0", "\0"))
    with pytest.raises(EnsembleError, match=reason):
        read_verified("mlp", model, [], allow_unverified=True)


def test_a_symlink_is_followed_and_what_it_names_is_checked(model: Path, tmp_path: Path) -> None:
    """As onnxruntime follows links from a model's folder (model caches link their files):
    the bytes read are digested wherever they lie."""
    outside = tmp_path.parent / f"{tmp_path.name}-weights.bin"
    (tmp_path / "weights.bin").rename(outside)
    (tmp_path / "weights.bin").symlink_to(outside)
    pin = Digest(model_digest(model), "its pin")
    read_verified("mlp", model, [pin])
    outside.write_bytes(outside.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelIntegrityError):
        read_verified("mlp", model, [pin])


@pytest.mark.parametrize(
    ("key", "value"),
    [("offset", "abc"), ("offset", "-1"), ("length", "1e3"), ("length", "9" * 5000)],
)
def test_an_offset_or_length_that_is_not_a_byte_count_is_refused(
    model: Path, key: str, value: str
) -> None:
    proto = onnx.load(str(model), load_external_data=False)
    tensor = next(
        t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    )
    tensor.external_data.add(key=key, value=value)  # the last entry of a key counts
    model.write_bytes(proto.SerializeToString())
    with pytest.raises(EnsembleError, match=f"has {key} .*, not a byte count"):
        read_model_files(model)


def test_a_location_that_is_not_text_is_refused(model: Path) -> None:
    data = model.read_bytes().replace(b"weights.bin", b"weights.bi\xee", 1)
    model.write_bytes(data)
    with pytest.raises(EnsembleError, match="is not a name"):
        read_model_files(model)


def test_files_named_twice_are_read_once_and_all_together_stay_under_the_limit(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto = onnx.load(str(model), load_external_data=False)
    externals = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor, alias in zip(externals, ("./weights.bin", "weights.bin/"), strict=False):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = alias
    model.write_bytes(proto.SerializeToString())
    assert list(read_model_files(model).external) == ["weights.bin"]  # one file, one name
    size = (model.parent / "weights.bin").stat().st_size
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", len(model.read_bytes()) + size - 1)
    with pytest.raises(EnsembleError, match="over 2 GiB"):
        read_model_files(model)


def test_a_tensor_in_a_functions_attribute_default_is_read_and_inlined(tmp_path: Path) -> None:
    """Every tensor counts wherever the model keeps it: here a model-local function's default
    for an attribute, which onnxruntime would otherwise read from the working directory."""
    weights = np.full(4, 2.0, np.float32)
    (tmp_path / "w.bin").write_bytes(weights.tobytes())
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="w.bin")
    const = helper.make_node("Constant", [], ["c"])
    attribute = const.attribute.add()
    attribute.name, attribute.ref_attr_name = "value", "w"
    attribute.type = onnx.AttributeProto.TENSOR
    add = helper.make_node("Add", ["x", "c"], ["y"])
    function = helper.make_function(
        "local", "F", ["x"], ["y"], [const, add], [helper.make_opsetid("", 17)]
    )
    function.attribute_proto.append(helper.make_attribute("w", tensor))
    graph = helper.make_graph(
        [helper.make_node("F", ["X"], ["Y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    proto = helper.make_model(graph, opset_imports=opsets, functions=[function], ir_version=9)
    (tmp_path / "f.onnx").write_bytes(proto.SerializeToString())
    files = read_model_files(tmp_path / "f.onnx")
    assert list(files.external) == ["w.bin"]
    session = ort.InferenceSession(files.self_contained(), providers=["CPUExecutionProvider"])
    (tmp_path / "w.bin").write_bytes(np.full(4, 666.0, np.float32).tobytes())  # too late
    result = session.run(None, {"X": np.zeros(4, np.float32)})[0]
    assert np.array_equal(result, weights)


def test_a_tensor_past_the_end_of_its_file_is_refused(model: Path) -> None:
    weights = model.parent / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(EnsembleError, match=r"reads bytes .* of 'weights.bin', which holds"):
        read_verified("mlp", model, [], allow_unverified=True)


def test_validate_names_the_models_digest_to_pin(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = model_digest(model)
    config = tmp_path / "gateway.yaml"
    member = "{name: mlp, model: mlp.onnx, placement: [{tier: edge}]%s}"
    ensemble = "ensembles:\n  - name: e\n    members:\n      - " + member + "\n"
    config.write_text(ensemble % "")
    assert main(["validate", str(config)]) == 1
    assert f"pin it with `sha256: {digest}`" in capsys.readouterr().err
    config.write_text(ensemble % f", sha256: '{digest}'")
    assert main(["validate", str(config)]) == 0
