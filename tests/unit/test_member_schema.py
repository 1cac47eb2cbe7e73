"""How a member's class scores and labels are found in an arbitrary ONNX classifier."""

from __future__ import annotations

import pytest

from ensemble.errors import EnsembleError
from ensemble.replicas.member import infer_classifier_schema
from ensemble.repository import label_array, label_datatype
from ensemble.types import TensorSpec

LABEL = TensorSpec("label", "INT64", (-1,))
PROBS = TensorSpec("probabilities", "FP32", (-1, 3))


def schema(outputs: list[TensorSpec], **kw: object) -> object:
    args: dict[str, object] = {
        "probability_output": None,
        "classes": None,
        "logits": False,
        "card": None,
    }
    args.update(kw)
    return infer_classifier_schema("m", outputs, **args)  # type: ignore[arg-type]


def test_only_rank2_float_output_is_chosen() -> None:
    s = schema([LABEL, PROBS])
    assert s.probability_output == "probabilities" and s.classes == (0, 1, 2)  # type: ignore[attr-defined]


def test_labels_precedence_config_then_graph() -> None:
    assert schema([PROBS], graph_classes=("a", "b", "c")).classes == ("a", "b", "c")  # type: ignore[attr-defined]
    assert schema([PROBS], classes=[5, 6, 7], graph_classes=(0, 1, 2)).classes == (5, 6, 7)  # type: ignore[attr-defined]


def test_ambiguous_outputs_need_config() -> None:
    other = TensorSpec("logits", "FP32", (-1, 3))
    with pytest.raises(EnsembleError, match="set `probability_output`"):
        schema([PROBS, other])
    assert schema([PROBS, other], probability_output="logits", logits=True).logits  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("outputs", "kw", "match"),
    [
        ([PROBS], {"probability_output": "nope"}, "not in the model"),
        ([LABEL], {"probability_output": "label"}, "must be a float tensor"),
        ([TensorSpec("p", "FP32", (-1, -1))], {}, "set `classes`"),
        ([PROBS], {"classes": [1, 2]}, "2 classes configured but output"),
    ],
)
def test_unusable_outputs_are_clear_errors(
    outputs: list[TensorSpec], kw: dict[str, object], match: str
) -> None:
    with pytest.raises(EnsembleError, match=match):
        schema(outputs, **kw)


def test_label_datatype_and_array() -> None:
    assert label_datatype((0, 1)) == "INT64" and label_array((3, 4)).tolist() == [3, 4]
    assert label_datatype(("a", 1)) == "BYTES"
    assert label_array(("a", "b")).tolist() == [b"a", b"b"]
