"""Splitting a model at a tensor: the cut points of the zoo's MLP, and a head and tail that
together answer exactly as the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ensemble.models.split import cut_points, split


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mlp(zoo_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(zoo_dir / "mlp_large.onnx"))


def test_the_mlp_can_be_cut_after_each_layer(mlp: onnx.ModelProto) -> None:
    cuts = {c.tensor: c for c in cut_points(mlp)}
    assert {"cast_input", "next_activations", "next_activations1"} <= set(cuts)
    assert "probabilities" not in cuts and "input" not in cuts  # outputs and inputs are no cut
    first, second = cuts["next_activations"], cuts["next_activations1"]
    assert first.datatype == "FP32" and first.after_node < second.after_node
    assert first.bytes_per_row is not None and first.bytes_per_row % 4 == 0
    assert cuts["cast_input"].bytes_per_row == 64 * 4  # the scaled input, before the first layer


@pytest.mark.parametrize("at", ["cast_input", "next_activations", "next_activations1"])
def test_head_then_tail_answers_as_the_whole_model(
    mlp: onnx.ModelProto, zoo_dir: Path, at: str
) -> None:
    x = np.load(zoo_dir / "test.npz")["X"].astype(np.float32)[:50]
    whole = session(mlp).run(["probabilities", "label"], {"input": x})
    head, tail = split(mlp, at)
    (middle,) = session(head).run([at], {"input": x})
    parts = session(tail).run(["probabilities", "label"], {at: middle})
    np.testing.assert_allclose(parts[0], whole[0], atol=1e-5)
    assert np.array_equal(parts[1], whole[1])


def test_a_tensor_that_is_no_cut_is_refused(mlp: onnx.ModelProto) -> None:
    with pytest.raises(ValueError, match="not a cut point"):
        split(mlp, "coefficient")  # a weight: not computed from the input
