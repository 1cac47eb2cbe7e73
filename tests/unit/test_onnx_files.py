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
        ("absent.bin", "is missing"),
        ("link.bin", "a link out of the model's folder"),
        ("fifo", "not a regular file"),
    ],
)
def test_a_location_outside_the_folder_or_not_a_file_is_refused(
    model: Path, tmp_path: Path, location: str, reason: str
) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes((tmp_path / "weights.bin").read_bytes())
    (tmp_path / "link.bin").symlink_to(outside)
    os.mkfifo(tmp_path / "fifo")  # reading it would block: never opened
    relocate(model, location)
    with pytest.raises(EnsembleError, match=reason):
        read_verified("mlp", model, [], allow_unverified=True)


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
