"""Members of one ensemble must take the same inputs: config loading (`ensemble validate`, and
`ensemble serve` before it loads anything) reads them from the ONNX files and points at the
offending member with file:line:col and its YAML path."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.errors import ConfigError
from ensemble.model_checks import read_inputs
from ensemble.types import TensorSpec

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"


def softmax_model(
    path: Path, *, name: str = "x", features: int = 4, elem: int = TensorProto.FLOAT
) -> None:
    """A tiny classifier: probabilities = softmax(input), input [n, features] of ``elem``."""
    x = helper.make_tensor_value_info(name, elem, ["n", features])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", features])
    nodes = [helper.make_node("Softmax", [name], ["probabilities"], axis=1)]
    if elem != TensorProto.FLOAT:
        nodes = [
            helper.make_node("Cast", [name], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Softmax", ["f"], ["probabilities"], axis=1),
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [p]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def write_config(tmp: Path, *files: str) -> Path:
    members = "".join(
        f"      - name: m{i}\n        model: {file}\n        placement: [{{tier: edge}}]\n"
        for i, file in enumerate(files)
    )
    path = tmp / "c.yaml"
    path.write_text(f"ensembles:\n  - name: e\n    members:\n{members}")
    return path


def test_the_inputs_read_from_a_file_are_onnxruntimes() -> None:
    assert read_inputs(ZOO / "logreg.onnx") == (TensorSpec("input", "FP32", (-1, 64)),)


def test_members_with_other_shapes_or_datatypes_are_errors_at_the_member(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    softmax_model(tmp_path / "a.onnx")
    softmax_model(tmp_path / "wide.onnx", features=5)
    softmax_model(tmp_path / "double.onnx", elem=TensorProto.DOUBLE)
    path = write_config(tmp_path, "a.onnx", "wide.onnx", "a.onnx", "double.onnx")
    with pytest.raises(ConfigError) as info:
        load_config(path)  # what `serve` and a reload load a config with
    wide, double = info.value.errors
    assert wide.startswith(f"{path}:8:9: ensembles[0].members[1].model: member 'm1' inputs ")
    expected = (
        "x FP32[-1, 5] differ from those of member 'm0' (ensembles[0].members[0]): x FP32[-1, 4]"
    )
    assert expected in wide
    assert double.startswith(f"{path}:14:9: ensembles[0].members[3].model: member 'm3'")
    assert "x FP64[-1, 4]" in double

    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:8:9: ensembles[0].members[1].model" in err
    assert f"{path}:14:9: ensembles[0].members[3].model" in err


def test_input_names_may_differ(tmp_path: Path) -> None:
    """An ensemble renames its input to each member's own, by position."""
    softmax_model(tmp_path / "a.onnx", name="x")
    softmax_model(tmp_path / "b.onnx", name="features")
    load_config(write_config(tmp_path, "a.onnx", "b.onnx"))


def test_files_that_are_missing_or_no_model_are_left_to_loading(tmp_path: Path) -> None:
    softmax_model(tmp_path / "a.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert read_inputs(tmp_path / "junk.onnx") is None
    load_config(write_config(tmp_path, "empty.onnx", "a.onnx", "junk.onnx"))
