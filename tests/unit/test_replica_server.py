"""`ensemble replica` without sockets: option checks, and the one-model repository it serves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.cli import main
from ensemble.control.build import single_model
from ensemble.errors import EnsembleError
from ensemble.replicas.engine import InProcessEngine
from ensemble.repository import LOCAL_TIER


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--executor-threads", "0"], "--executor-threads: Input should be greater than or equal"),
        (["--http-port", "70000"], "--http-port: Input should be less than or equal to 65535"),
        (["--drain-timeout-s", "0"], "--drain-timeout-s: Input should be greater than 0"),
        (["--name", "no spaces"], "model name 'no spaces' must match"),
    ],
)
def test_bad_options_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replica", "model.onnx", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replica", str(tmp_path / "absent.onnx"), "--http-port", "0", "--grpc-port", "0"])
    assert code == 1
    assert "model file not found" in capsys.readouterr().err


def test_a_zoo_model_is_served_with_its_card(zoo_dir: Path) -> None:
    engine = InProcessEngine(1)
    try:
        repo = single_model(zoo_dir / "logreg.onnx", "digits_lr", engine).repository
        assert repo.names() == ["digits_lr"] and not repo.ensembles
        member = repo.members["digits_lr"]
        assert member.card is not None and member.classifier.classes == tuple(range(10))
        assert [r.name for r in member.replicas] == [f"{LOCAL_TIER}/0"]
        assert repo.tiers == (LOCAL_TIER,)
    finally:
        engine.shutdown()


def test_a_missing_explicit_card_is_an_error(zoo_dir: Path, tmp_path: Path) -> None:
    engine = InProcessEngine(1)
    try:
        with pytest.raises(EnsembleError, match="card not found"):
            single_model(zoo_dir / "logreg.onnx", "m", engine, tmp_path / "x.json")
    finally:
        engine.shutdown()


def two_float_outputs(path: Path) -> None:
    """A model that is no classifier the gateway could read (two rank-2 float outputs)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
        "g",
        [x],
        [a, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_any_onnx_model_is_served_even_when_it_is_no_classifier(tmp_path: Path) -> None:
    two_float_outputs(tmp_path / "twice.onnx")
    engine = InProcessEngine(1)
    try:
        repo = single_model(tmp_path / "twice.onnx", "twice", engine).repository
        member = repo.members["twice"]
        assert member.schema is None
        with pytest.raises(EnsembleError, match="no class-score output"):
            _ = member.score_outputs

        async def run() -> dict[str, np.ndarray]:
            return await member.only().infer({"x": np.ones((2, 3), np.float32)})

        result = asyncio.run(run())
        assert result["b"].tolist() == [[-1.0] * 3] * 2
    finally:
        engine.shutdown()
