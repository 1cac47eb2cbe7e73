"""Members that differ, through a real gateway: two foreign classifiers trained here on the
digits data bundled with scikit-learn, one taking `features` as FP64 with classes 10..19, one
taking `pixels` as INT64 with classes named `zero`..`nine`, join the zoo's `logreg` (FP32
`input`, classes 0..9) in one ensemble that declares its own input and classes; each maps to
them. An input or class map that does not fit is refused when the config loads, with its file
and line."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from ensemble.config import load_config
from ensemble.errors import ConfigError
from tests.integration.conftest import array_input
from tests.integration.process import ZOO, GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def train(path: Path, input_name: str, datatype: str, labels: np.ndarray) -> str:
    """A logistic regression on scikit-learn's digits, exported with its own input name,
    datatype and class labels; its SHA-256 (foreign models have no card: the config pins it)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, Int64TensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(x / 16.0 * 16.0, labels[y])
    kind = {"FP64": DoubleTensorType, "INT64": Int64TensorType}[datatype]
    onnx_model = convert_sklearn(
        model,
        initial_types=[(input_name, kind([None, 64]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    path.write_bytes(onnx_model.SerializeToString())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign(name: str, path: Path, digest: str, inputs: dict[str, str], labels: list[Any]) -> Any:
    """The member's config: its labels in output order (the exported graph keeps them in an
    initializer the gateway cannot read), each mapped to the ensemble's digit."""
    return {
        "name": name,
        "model": str(path),
        "sha256": digest,
        "placement": [{"tier": "edge"}],
        "classes": labels,
        "inputs": inputs,
        "class_map": {str(label): digit for digit, label in enumerate(labels)},
    }


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("foreign")
    tens = tmp / "tens.onnx"
    tens_sha = train(tens, "features", "FP64", np.arange(10, 20))
    words = tmp / "words.onnx"
    words_sha = train(words, "pixels", "INT64", np.asarray(NAMES))
    return [
        zoo_member("logreg"),
        foreign("tens", tens, tens_sha, {"features": "input"}, list(range(10, 20))),
        foreign("words", words, words_sha, {"pixels": "input"}, list(NAMES)),
    ]


def config(members: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ensembles": [
            {
                "name": "digits",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                "classes": list(range(10)),
                "members": members,
            }
        ]
    }


@pytest.fixture(scope="module")
def gw(
    zoo_dir: Path, members: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    proc = start_from_config(config(members), tmp_path_factory.mktemp("gw"))
    yield proc
    assert proc.stop() == 0, proc.log()


def test_foreign_members_answer_in_the_ensembles_terms(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        body = {"inputs": [array_input(x[:100])]}
        response = client.post("/v2/models/digits/infer", json=body)
        assert response.status_code == 200, response.text
        doc = response.json()
        labels = next(o for o in doc["outputs"] if o["name"] == "label")["data"]
        assert np.mean(np.asarray(labels) == y[:100]) > 0.9
        answered = doc["parameters"]["members_answered"].split(",")
        assert sorted(answered) == ["logreg@edge", "tens@edge", "words@edge"]
        meta = client.get("/v2/models/digits").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        # A foreign member is a model of its own too, in its own terms.
        own = client.get("/v2/models/tens").json()["inputs"][0]
        assert (own["name"], own["datatype"]) == ("features", "FP64")
        own = client.get("/v2/models/words").json()["inputs"][0]
        assert (own["name"], own["datatype"]) == ("pixels", "INT64")
        direct = {
            "inputs": [
                {"name": "features", "datatype": "FP64", "shape": [1, 64], "data": x[0].tolist()}
            ]
        }
        answer = client.post("/v2/models/tens/infer", json=direct)
        assert answer.status_code == 200, answer.text
        tens_label = next(o for o in answer.json()["outputs"] if o["name"] == "label")["data"]
        assert tens_label == [10 + int(y[0])]


def refused(members: list[dict[str, Any]], tmp: Path) -> tuple[Path, str]:
    """The config file of an ensemble of ``members``, and the one error loading it gives."""
    path = tmp / "gateway.yaml"
    doc = {"model_zoo": {"dir": str(ZOO)}, **config(members)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    return path, error


def test_a_map_that_does_not_fit_is_refused_with_its_line(
    zoo_dir: Path, members: list[dict[str, Any]], tmp_path: Path
) -> None:
    wrong = [members[0], {**members[1], "inputs": {"feature": "input"}}, members[2]]
    path, error = refused(wrong, tmp_path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "feature:" in text)
    assert error.startswith(f"{path}:{line - 1}:") or error.startswith(f"{path}:{line}:"), error
    assert "ensembles[0].members[1].inputs" in error
    assert "not the model's: feature" in error and "not mapped: features" in error


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"eight": None},
            "class_map: the model's classes are zero, one, two, three, four, five, "
            "six, seven, eight, nine; not mapped: eight",
        ),
        (
            {"nine": 10},
            "class_map.nine: 10 is no class of the ensemble (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)",
        ),
    ],
)
def test_a_class_map_that_does_not_fit_is_refused_with_its_line(
    zoo_dir: Path, members: list[dict[str, Any]], tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    class_map = {**members[2]["class_map"], **change}
    class_map = {label: digit for label, digit in class_map.items() if digit is not None}
    wrong = [members[0], members[1], {**members[2], "class_map": class_map}]
    path, error = refused(wrong, tmp_path)
    lines = path.read_text().splitlines()
    # tens's map comes first, then words's (the one changed); logreg has none.
    line = [i for i, text in enumerate(lines, 1) if text.strip().startswith("class_map:")][1]
    assert error.startswith(f"{path}:{line}:"), error
    assert f"ensembles[0].members[2].{said}" in error, error
