"""Any ONNX classifier pointed at by config works: skl2onnx defaults (ZipMap), string labels."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from tests.integration.process import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration


def export(model: object, x: np.ndarray, path: Path) -> None:
    from skl2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})  # default: ZipMap
    path.write_bytes(onx.SerializeToString())


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, dict]]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    tmp = tmp_path_factory.mktemp("foreign")
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    fitted = {
        "lr": LogisticRegression(max_iter=1000).fit(x, y),
        "tree": DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y),
        "lr_named": LogisticRegression(max_iter=1000).fit(x, names),
        "tree_named": DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, names),
    }
    for name, model in fitted.items():
        export(model, x, tmp / f"{name}.onnx")

    def member(name: str, tier: str) -> dict[str, object]:
        # A model without a member card is served only with its digest pinned in the config.
        digest = hashlib.sha256((tmp / f"{name}.onnx").read_bytes()).hexdigest()
        return {
            "name": name,
            "model": f"{name}.onnx",
            "sha256": digest,
            "placement": [{"tier": tier}],
        }

    config = {
        "ensembles": [
            {"name": "iris", "members": [member("lr", "edge"), member("tree", "cloud")]},
            {
                "name": "flowers",
                "policy": "vote",
                "members": [member("lr_named", "edge"), member("tree_named", "cloud")],
            },
        ],
        "policies": {"vote": {"aggregation": {"name": "majority_vote"}}},
    }
    (tmp / "iris.yaml").write_text(yaml.safe_dump(config))
    gw = start_gateway(tmp / "iris.yaml", tmp / "gw.log")
    yield gw, {"x": x, "y": y, "names": names, "models": fitted}
    assert gw.stop() == 0


def test_zipmap_members_form_an_ensemble(iris: tuple[GatewayProcess, dict]) -> None:
    gw, data = iris
    client = httpclient.InferenceServerClient(gw.http_target)
    meta = client.get_model_metadata("iris")
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"][1]["shape"] == [-1, 3]
    member_meta = client.get_model_metadata("lr")
    assert {"name": "output_probability", "datatype": "FP32", "shape": [-1, 3]} in member_meta[
        "outputs"
    ]

    x = data["x"]
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("iris", [inp])
    expected = (data["models"]["lr"].predict_proba(x) + data["models"]["tree"].predict_proba(x)) / 2
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)
    assert float(np.mean(result.as_numpy("label") == data["y"])) > 0.9

    direct = client.infer("lr", [inp])
    np.testing.assert_allclose(
        direct.as_numpy("output_probability"), data["models"]["lr"].predict_proba(x), atol=1e-4
    )
    assert np.array_equal(direct.as_numpy("output_label"), data["models"]["lr"].predict(x))


def test_string_labels_come_back_as_bytes(iris: tuple[GatewayProcess, dict]) -> None:
    gw, data = iris
    x = data["x"][:10]
    client = grpcclient.InferenceServerClient(gw.grpc_target)
    meta = client.get_model_metadata("flowers")
    assert [(o.name, o.datatype) for o in meta.outputs] == [
        ("label", "BYTES"),
        ("probabilities", "FP32"),
    ]
    inp = grpcclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    labels = client.infer("flowers", [inp]).as_numpy("label")
    assert [v.decode() for v in labels] == data["names"][:10].tolist()
    client.close()

    http = httpclient.InferenceServerClient(gw.http_target)
    hinp = httpclient.InferInput("X", list(x.shape), "FP32")
    hinp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("label", binary_data=False)
    result = http.infer("flowers", [hinp], outputs=[out])
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == (
        data["names"][:10].tolist()
    )
