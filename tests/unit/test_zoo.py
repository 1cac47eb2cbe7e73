"""Tests for the digits model zoo: the built files, their cards, and the build/ensure contract."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from ensemble.models import (
    DEFAULT_ZOO_DIR,
    MEMBER_NAMES,
    NUMPY_TO_OIP,
    OIP_TO_NUMPY,
    MemberCard,
    OipDatatype,
    TensorSpec,
    ZooManifest,
    build_zoo,
    card_path_for,
    complete_manifest,
    default_zoo_dir,
    ensure_zoo,
    load_card,
    load_manifest,
    numpy_to_oip,
    onnx_io_specs,
    save_card,
)
from ensemble.models import zoo as zoo_module
from ensemble.models.layout import zoo_files
from ensemble.models.onnx_io import ORT_TO_OIP

INT8_OF = {
    "mlp_small_int8": "mlp_small",
    "mlp_large_int8": "mlp_large",
    "mlp_deep_int8": "mlp_deep",
}
# Every member reaches 0.96-0.98 with seed 0; the margin absorbs library and seed changes.
MIN_ACCURACY = 0.92
"""A floor every member clears (a broken export or quantization scores about 0.1); the int8
members must also stay within 0.02 of their fp32 source."""


def _card(zoo_dir: Path, name: str) -> MemberCard:
    return load_card(zoo_dir / f"{name}.card.json")


def _test_set(zoo_dir: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(zoo_dir / "test.npz") as arrays:
        return arrays["X"], arrays["y"]


def _run(zoo_dir: Path, card: MemberCard, x: npt.NDArray[np.float32]) -> tuple[Any, Any]:
    session = ort.InferenceSession(
        str(zoo_dir / card.model_file), providers=["CPUExecutionProvider"]
    )
    assert card.label_output is not None
    labels, probabilities = session.run(
        [card.label_output, card.probability_output], {card.inputs[0].name: x}
    )
    return labels, probabilities


def _mtimes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


# --- the built zoo -------------------------------------------------------------------------


def test_manifest_describes_the_split(zoo_dir: Path) -> None:
    manifest = load_manifest(zoo_dir)
    assert manifest.members == list(MEMBER_NAMES)
    assert manifest.dataset == "sklearn.datasets.load_digits"
    assert manifest.seed == 0
    assert manifest.classes == list(range(10))
    assert (manifest.train_size, manifest.validation_size, manifest.test_size) == (1077, 360, 360)
    assert len(manifest.validation_labels) == manifest.validation_size
    assert set(manifest.validation_labels) == set(range(10))
    assert {"onnxruntime", "scikit-learn", "skl2onnx"} <= set(manifest.library_versions)
    assert 0 < manifest.build_seconds < 60


def test_test_set_holds_raw_pixels_stratified(zoo_dir: Path) -> None:
    x, y = _test_set(zoo_dir)
    assert x.dtype == np.float32 and x.shape == (360, 64)
    assert y.dtype == np.int64 and y.shape == (360,)
    assert x.min() == 0 and x.max() == 16
    assert np.all(x == np.round(x))
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_member_output_reproduces_card_test_accuracy(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    x, y = _test_set(zoo_dir)
    labels, probabilities = _run(zoo_dir, card, x)
    assert labels.dtype == np.int64 and labels.shape == (360,)
    assert probabilities.dtype == np.float32 and probabilities.shape == (360, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert float(np.mean(labels == y)) == pytest.approx(card.test_accuracy, abs=1e-12)


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_member_is_accurate(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    assert card.accuracy >= MIN_ACCURACY
    assert card.test_accuracy >= MIN_ACCURACY


@pytest.mark.parametrize(("int8_name", "fp32_name"), INT8_OF.items())
def test_int8_member_is_quantized_and_keeps_accuracy(
    zoo_dir: Path, int8_name: str, fp32_name: str
) -> None:
    int8, fp32 = _card(zoo_dir, int8_name), _card(zoo_dir, fp32_name)
    assert (int8.variant, fp32.variant) == ("int8", "fp32")
    assert abs(int8.accuracy - fp32.accuracy) <= 0.02
    assert abs(int8.test_accuracy - fp32.test_accuracy) <= 0.02
    assert int8.size_bytes < 0.5 * fp32.size_bytes
    ops = {node.op_type for node in onnx.load(zoo_dir / int8.model_file).graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_card_round_trips_through_the_model(zoo_dir: Path, tmp_path: Path, name: str) -> None:
    raw = (zoo_dir / f"{name}.card.json").read_text()
    card = MemberCard.model_validate_json(raw)
    assert json.loads(card.model_dump_json()) == json.loads(raw)
    save_card(card, tmp_path / "copy.card.json")
    assert load_card(tmp_path / "copy.card.json") == card


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_card_matches_its_model_file(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    model_path = zoo_dir / card.model_file
    assert card.model_file == f"{name}.onnx"
    assert card_path_for(model_path) == zoo_dir / f"{name}.card.json"
    content = model_path.read_bytes()
    assert card.size_bytes == len(content)
    assert card.sha256 == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_validation_predictions_reproduce_accuracy(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    labels = np.asarray(load_manifest(zoo_dir).validation_labels)
    predictions = np.asarray(card.validation_predictions)
    assert predictions.shape == labels.shape
    assert float(np.mean(predictions == labels)) == pytest.approx(card.accuracy, abs=1e-12)
    for label in card.classes:
        recall = float(np.mean(predictions[labels == label] == label))
        assert card.per_class_accuracy[str(label)] == pytest.approx(recall, abs=1e-12)
    probabilities = np.asarray(card.validation_probabilities)
    assert probabilities.shape == (len(labels), len(card.classes))
    # Rounding to 5 decimals may break a near-tie, so allow a stray disagreement or two.
    assert np.mean(probabilities.argmax(axis=1) == predictions) >= 0.99


@pytest.mark.parametrize("name", MEMBER_NAMES)
def test_card_io_matches_the_onnx_file(zoo_dir: Path, name: str) -> None:
    card = _card(zoo_dir, name)
    assert card.inputs == [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
    assert card.outputs == [
        TensorSpec(name="label", datatype="INT64", shape=[-1]),
        TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
    ]
    assert (card.inputs, card.outputs) == onnx_io_specs(zoo_dir / card.model_file)


def test_cards_carry_latency_profiles_and_weight_counts(zoo_dir: Path) -> None:
    cards = {name: _card(zoo_dir, name) for name in MEMBER_NAMES}
    for card in cards.values():
        assert set(card.latency_ms) == {"batch_1", "batch_32"}
        assert card.latency_ms["batch_1"].runs == 200
        assert card.latency_ms["batch_32"].runs == 50
        for stats in card.latency_ms.values():
            assert 0 < stats.p50_ms <= stats.p99_ms
    # The large MLP does ~450x the arithmetic of the small one; a 5x gap is safe on any machine.
    large, small = cards["mlp_large"].latency_ms, cards["mlp_small"].latency_ms
    assert large["batch_32"].p50_ms > 5 * small["batch_32"].p50_ms
    assert cards["logreg"].parameters == 64 * 10 + 10
    assert cards["mlp_small"].parameters == 64 * 64 + 64 + 64 * 10 + 10
    assert cards["mlp_large_int8"].parameters == cards["mlp_large"].parameters
    assert cards["forest"].parameters is None


# --- ensure_zoo / build_zoo ----------------------------------------------------------------


def test_ensure_zoo_leaves_a_complete_zoo_alone(zoo_dir: Path) -> None:
    before = _mtimes(zoo_dir)
    assert ensure_zoo(zoo_dir) == load_manifest(zoo_dir)
    assert _mtimes(zoo_dir) == before


def _break_missing_model(directory: Path) -> None:
    (directory / "forest.onnx").unlink()


def _break_missing_card(directory: Path) -> None:
    (directory / "mlp_small_int8.card.json").unlink()


def _break_missing_test_set(directory: Path) -> None:
    (directory / "test.npz").unlink()


def _break_missing_manifest(directory: Path) -> None:
    (directory / "zoo.json").unlink()


def _break_unreadable_manifest(directory: Path) -> None:
    (directory / "zoo.json").write_text('{"format_version": ')


def _break_old_layout(directory: Path) -> None:
    raw = json.loads((directory / "zoo.json").read_text())
    raw["format_version"] = 0
    (directory / "zoo.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "damage",
    [
        _break_missing_model,
        _break_missing_card,
        _break_missing_test_set,
        _break_missing_manifest,
        _break_unreadable_manifest,
        _break_old_layout,
    ],
)
def test_ensure_zoo_rebuilds_an_incomplete_zoo(
    zoo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any
) -> None:
    copy = tmp_path / "digits"
    shutil.copytree(zoo_dir, copy)
    damage(copy)
    assert complete_manifest(copy) is None
    built: list[Path] = []
    sentinel = load_manifest(zoo_dir)

    def fake_build(out_dir: Path, seed: int, progress: Any) -> ZooManifest:
        built.append(out_dir)
        return sentinel

    monkeypatch.setattr(zoo_module, "_build", fake_build)
    assert ensure_zoo(copy) is sentinel
    assert built == [copy.resolve()]


@pytest.mark.slow
def test_ensure_zoo_really_rebuilds_a_partial_zoo(zoo_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "digits"
    shutil.copytree(zoo_dir, copy)
    _break_missing_model(copy)
    _break_missing_card(copy)
    lines: list[str] = []
    manifest = ensure_zoo(copy, progress=lines.append)
    assert complete_manifest(copy) == manifest
    assert all((copy / name).is_file() for name in zoo_files())
    assert "training forest ..." in lines
    assert any(line.startswith("quantizing") for line in lines)
    assert any(line.startswith("profiling") for line in lines)
    for name in MEMBER_NAMES:
        card = _card(copy, name)
        assert card.sha256 == hashlib.sha256((copy / card.model_file).read_bytes()).hexdigest()
    # Same seed, same data: the rebuilt members agree with the originals.
    assert manifest.validation_labels == load_manifest(zoo_dir).validation_labels
    assert _card(copy, "logreg").accuracy == _card(zoo_dir, "logreg").accuracy


class _Interrupted(Exception):
    pass


def _interrupt_at_forest(line: str) -> None:
    if line == "training forest ...":
        raise _Interrupted(line)


def test_interrupted_build_leaves_nothing_behind(tmp_path: Path) -> None:
    out_dir = tmp_path / "digits"
    with pytest.raises(_Interrupted):
        build_zoo(out_dir, progress=_interrupt_at_forest)
    assert not out_dir.exists()
    assert not list(tmp_path.glob(".digits.build-*"))


def test_interrupted_rebuild_keeps_the_previous_zoo(zoo_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "digits"
    shutil.copytree(zoo_dir, copy)
    before = _mtimes(copy)
    with pytest.raises(_Interrupted):
        build_zoo(copy, progress=_interrupt_at_forest)
    assert _mtimes(copy) == before
    assert complete_manifest(copy) == load_manifest(zoo_dir)


def test_member_names_match_the_training_recipes() -> None:
    from ensemble.models import training

    assert set(MEMBER_NAMES) == {*training.TRAINED_MEMBERS, *training.QUANTIZED_MEMBERS}
    assert dict(training.QUANTIZED_MEMBERS) == INT8_OF


def test_default_zoo_dir_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert DEFAULT_ZOO_DIR.as_posix() == "models/digits"
    assert default_zoo_dir() == tmp_path / "models" / "digits"


# --- cards ---------------------------------------------------------------------------------


def test_card_path_for_sits_next_to_the_model() -> None:
    assert card_path_for(Path("/zoo/mlp_large.onnx")) == Path("/zoo/mlp_large.card.json")
    assert card_path_for(Path("rel/model.v2.onnx")) == Path("rel/model.v2.card.json")


def _card_fields(zoo_dir: Path) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads((zoo_dir / "logreg.card.json").read_text())
    return fields


def test_card_rejects_unknown_fields(zoo_dir: Path) -> None:
    fields = _card_fields(zoo_dir) | {"acuracy": 0.99}
    with pytest.raises(ValidationError, match="acuracy"):
        MemberCard.model_validate(fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probability_output": "scores"}, "probability_output"),
        ({"label_output": "class"}, "label_output"),
        ({"validation_predictions": [1, 2]}, "differ in length"),
        ({"sha256": "not-a-digest"}, "sha256"),
        ({"accuracy": 1.5}, "accuracy"),
        ({"variant": "fp8"}, "variant"),
    ],
)
def test_card_rejects_inconsistent_values(
    zoo_dir: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        MemberCard.model_validate(_card_fields(zoo_dir) | change)


# --- ONNX / OIP / numpy type mapping -------------------------------------------------------

_ONNX_TYPES: dict[OipDatatype, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _identity_model(path: Path, types: Mapping[str, int]) -> None:
    """One Identity per type, with a symbolic batch dimension and an unnamed second one."""
    inputs, outputs, nodes = [], [], []
    for key, elem_type in types.items():
        inputs.append(helper.make_tensor_value_info(f"in_{key}", elem_type, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{key}", elem_type, [None, 3]))
        nodes.append(helper.make_node("Identity", [f"in_{key}"], [f"out_{key}"]))
    graph = helper.make_graph(nodes, "identities", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_onnx_io_specs_maps_every_datatype(tmp_path: Path) -> None:
    path = tmp_path / "identities.onnx"
    _identity_model(path, _ONNX_TYPES)
    inputs, outputs = onnx_io_specs(path)
    assert inputs == [
        TensorSpec(name=f"in_{datatype}", datatype=datatype, shape=[-1, 3])
        for datatype in _ONNX_TYPES
    ]
    assert outputs == [
        TensorSpec(name=f"out_{datatype}", datatype=datatype, shape=[-1, 3])
        for datatype in _ONNX_TYPES
    ]


def test_oip_numpy_dtypes_are_what_onnxruntime_takes_and_returns(tmp_path: Path) -> None:
    path = tmp_path / "identities.onnx"
    _identity_model(path, _ONNX_TYPES)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        f"in_{datatype}": np.array([["1", "0", "1"]]).astype(OIP_TO_NUMPY[datatype])
        if datatype == "BYTES"
        else np.ones((2, 3), dtype=OIP_TO_NUMPY[datatype])
        for datatype in _ONNX_TYPES
    }
    results = session.run([f"out_{datatype}" for datatype in _ONNX_TYPES], feeds)
    for datatype, result in zip(_ONNX_TYPES, results, strict=True):
        assert result.dtype == OIP_TO_NUMPY[datatype], datatype


def test_onnx_io_specs_rejects_types_oip_cannot_carry(tmp_path: Path) -> None:
    path = tmp_path / "bfloat16.onnx"
    _identity_model(path, {"BF16": TensorProto.BFLOAT16})
    with pytest.raises(ValueError, match=r"tensor\(bfloat16\)"):
        onnx_io_specs(path)


def test_type_tables_cover_every_oip_datatype() -> None:
    every = set(get_args(OipDatatype))
    assert set(ORT_TO_OIP.values()) == every
    assert set(OIP_TO_NUMPY) == every
    assert {NUMPY_TO_OIP[dtype] for dtype in OIP_TO_NUMPY.values()} == every


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.dtype(np.float32), "FP32"),
        (np.dtype(">i4"), "INT32"),
        (np.dtype(np.bool_), "BOOL"),
        (np.dtype("<U5"), "BYTES"),
        (np.dtype("S3"), "BYTES"),
        (np.dtype(object), "BYTES"),
    ],
)
def test_numpy_to_oip(dtype: np.dtype[Any], datatype: str) -> None:
    assert numpy_to_oip(dtype) == datatype


def test_numpy_to_oip_rejects_dtypes_without_an_oip_datatype() -> None:
    with pytest.raises(ValueError, match="complex64"):
        numpy_to_oip(np.dtype(np.complex64))
