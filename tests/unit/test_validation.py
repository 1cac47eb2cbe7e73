"""Request tensors are checked against model metadata with messages that say what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.dataplane.validation import check_inputs, check_outputs
from ensemble.errors import InvalidInput
from ensemble.types import ModelMetadata, RequestedOutput, Tensor, TensorSpec

META = ModelMetadata(
    "m",
    ("1",),
    "onnxruntime_onnx",
    (TensorSpec("input", "FP32", (-1, 4)),),
    (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)


def t(name: str = "input", datatype: str = "FP32", shape: tuple[int, ...] = (2, 4)) -> Tensor:
    return Tensor(name, datatype, shape, np.zeros(shape, dtype=np.float32))


def test_good_feed() -> None:
    feed = check_inputs(META, [t()], 8)
    assert list(feed) == ["input"] and feed["input"].shape == (2, 4)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ([t("x")], "unknown input 'x'"),
        ([t(), t("extra")], "unknown input 'extra'"),
        ([t(), t()], "more than once"),
        ([t(datatype="FP64")], "datatype FP64 does not match the model's FP32"),
        ([t(shape=(2, 5))], r"shape \[2, 5\] does not match"),
        ([t(shape=(8,))], "does not match"),
        ([t(shape=(0, 4))], "batch dimension is 0"),
        ([t(shape=(9, 4))], "exceeds the limit of 8"),
    ],
)
def test_bad_inputs(tensors: list[Tensor], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        check_inputs(META, tensors, 8)


def test_missing_input() -> None:
    two = ModelMetadata("m", ("1",), "x", (META.inputs[0], TensorSpec("b", "FP32", (-1,))), ())
    with pytest.raises(InvalidInput, match="missing input"):
        check_inputs(two, [t()], 8)


def test_outputs_checked() -> None:
    check_outputs(META, [RequestedOutput("label")])
    with pytest.raises(InvalidInput, match="unknown output 'nope'"):
        check_outputs(META, [RequestedOutput("nope")])
    with pytest.raises(InvalidInput, match="more than once"):
        check_outputs(META, [RequestedOutput("label"), RequestedOutput("label")])
