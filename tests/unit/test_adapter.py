"""A member that differs from its ensemble: inputs renamed and converted, classes mapped (missing
ones 0, several onto one summed), and every way a map can fail to fit, named."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.errors import EnsembleError
from ensemble.replicas.adapter import adapter
from ensemble.types import TensorSpec

ENSEMBLE = (TensorSpec("input", "FP32", (-1, 4)),)


def test_inputs_are_renamed_and_converted_and_classes_mapped() -> None:
    own = (TensorSpec("features", "FP64", (-1, 4)),)
    mapped = {"a": "a", "b": "b", "c": "b"}
    fitted = adapter(
        "m", own, ("b", "a", "c"), ENSEMBLE, tuple("abcd"), {"features": "input"}, mapped
    )
    feed = fitted.feed({"input": np.ones((2, 4), np.float32)})
    assert list(feed) == ["features"] and feed["features"].dtype == np.float64
    scores = fitted.scores(np.array([[0.2, 0.5, 0.3]], np.float32))
    assert scores.tolist() == [[pytest.approx(0.5), pytest.approx(0.5), 0.0, 0.0]]
    assert not fitted.plain


def test_the_same_inputs_and_classes_need_no_mapping() -> None:
    fitted = adapter("m", ENSEMBLE, (0, 1), ENSEMBLE, (0, 1), None, None)
    assert fitted.plain and fitted.columns is None
    renamed = adapter(
        "m", (TensorSpec("x", "FP32", (-1, 4)),), (0, 1), ENSEMBLE, (0, 1), None, None
    )
    assert not renamed.plain and list(renamed.feed({"input": np.zeros((1, 4))})) == ["x"]


@pytest.mark.parametrize(
    ("own", "classes", "input_map", "class_map", "message"),
    [
        ((TensorSpec("f", "FP32", (-1, 5)),), (0, 1), {"f": "input"}, None, "cannot take"),
        ((TensorSpec("f", "BYTES", (-1, 4)),), (0, 1), {"f": "input"}, None, "cannot take"),
        ((TensorSpec("f", "FP32", (-1, 4)),), (0, 1), {"g": "input"}, None, "not the model's: g"),
        ((TensorSpec("f", "FP32", (-1, 4)),), (0, 1), {"f": "pixels"}, None, "no input 'pixels'"),
        (ENSEMBLE * 2, (0, 1), None, None, "2 input(s)"),
        (ENSEMBLE, (1, 0), None, None, "map them with `class_map`"),
        (ENSEMBLE, (0, 1), None, {"0": 0}, "not mapped: 1"),
        (ENSEMBLE, (0, 1), None, {"0": 0, "1": 7}, "7 is no class"),
    ],
)
def test_what_does_not_fit_is_named(
    own: tuple[TensorSpec, ...],
    classes: tuple[int, ...],
    input_map: dict[str, str] | None,
    class_map: dict[str, int] | None,
    message: str,
) -> None:
    with pytest.raises(EnsembleError) as info:
        adapter("ensembles[0].members[1]", own, classes, ENSEMBLE, (0, 1), input_map, class_map)
    assert message in info.value.message and "ensembles[0].members[1]" in info.value.message
