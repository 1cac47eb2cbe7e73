"""Feedback through a real gateway: labels joined by request id teach exp4 and track accuracy."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import array_input
from tests.integration.process import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.integration
ZOO = ROOT / "models" / "digits"
MEMBERS = ("logreg", "forest", "mlp_small")
N_FEEDBACK = 100
# Rows 100-199 of the test split: the members err on different rows there (2, 1 and 3 times),
# so exp4's weights must drift apart (on rows 0-99 each member errs 4 times: a tie).
FIRST_ROW = 100


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("feedback")
    config = {
        "server": {"feedback_window": 1000, "feedback_accuracy_window": 200},
        "ensembles": [
            {
                "name": "digits",
                "policy": "learn",
                "members": [
                    {"name": m, "model": str(ZOO / f"{m}.onnx"), "placement": [{"tier": "edge"}]}
                    for m in MEMBERS
                ],
            }
        ],
        "policies": {
            # a large learning rate, so ~100 labels move the weights visibly
            "learn": {"selection": {"name": "exp4", "params": {"eta": 0.5}}},
            "bandit": {"selection": {"name": "exp3"}},
        },
        "model_zoo": {"dir": str(ZOO)},
    }
    path = tmp / "feedback.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = start_gateway(path, tmp / "gw.log")
    yield gw
    assert gw.stop() == 0
    assert "Traceback" not in gw.log(), gw.log()


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(ZOO / "test.npz")
    return data["X"].astype(np.float32), data["y"].astype(np.int64)


def metrics(gw: GatewayProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    body = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def weights(gw: GatewayProcess) -> dict[str, float]:
    return {
        labels["member"]: value
        for labels, value in metrics(gw).get("ensemble_selection_weight", [])
        if labels["profile"] == "learn"
    }


def feedback(gw: GatewayProcess, model: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{gw.http_url}/v2/models/{model}/feedback", content=content, timeout=10)


def infer_json(gw: GatewayProcess, x: np.ndarray, **extra: object) -> dict[str, object]:
    body = {
        "inputs": [array_input(x)],
        **extra,
    }
    resp = httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    doc: dict[str, object] = resp.json()
    return doc


def test_feedback_tracks_accuracy_and_teaches_exp4(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    client = httpclient.InferenceServerClient(gateway.http_target, network_timeout=30)
    for i in range(FIRST_ROW, FIRST_ROW + N_FEEDBACK):
        inp = httpclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        result = client.infer("digits", [inp], request_id=f"req-{i}")
        assert result.get_response()["id"] == f"req-{i}"
        if i == FIRST_ROW:  # exp4 starts with equal weights once it has seen the members
            assert weights(gateway) == pytest.approx(dict.fromkeys(MEMBERS, 1 / 3))
        resp = feedback(gateway, "digits", {"id": f"req-{i}", "label": int(y[i])})
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["accepted"] is True
        assert set(doc["members"]) == set(MEMBERS)
        assert all(isinstance(v, bool) for v in doc["members"].values())
    client.close()

    scraped = metrics(gateway)
    accuracy = {
        labels["member"]: value
        for labels, value in scraped["ensemble_member_rolling_accuracy"]
        if labels["ensemble"] == "digits"
    }
    assert set(accuracy) == set(MEMBERS)
    for member, value in accuracy.items():
        card = json.loads((ZOO / f"{member}.card.json").read_text())
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(card["accuracy"], abs=0.08), member
    accepted = [
        v
        for labels, v in scraped["ensemble_feedback_total"]
        if labels == {"ensemble": "digits", "outcome": "accepted"}
    ]
    assert accepted == [N_FEEDBACK]
    learned = weights(gateway)
    assert sum(learned.values()) == pytest.approx(1.0)
    assert learned != pytest.approx(dict.fromkeys(MEMBERS, 1 / 3), abs=1e-3)
    # the member that was right most often carries the largest weight
    assert max(learned, key=learned.__getitem__) == max(accuracy, key=accuracy.__getitem__)


def test_batch_feedback_and_second_profile(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    infer_json(gateway, x[200:204], id="batch-1")
    resp = feedback(gateway, "digits", {"id": "batch-1", "label": y[200:204].tolist()})
    assert resp.status_code == 200, resp.text
    shares = resp.json()["members"]
    assert set(shares) == set(MEMBERS) and all(0.0 <= s <= 1.0 for s in shares.values())

    doc = infer_json(gateway, x[210:211], id="bandit-1", parameters={"policy": "bandit"})
    params = doc["parameters"]
    assert isinstance(params, dict) and params["policy"] == "bandit"
    resp = feedback(gateway, "digits", {"id": "bandit-1", "label": int(y[210])})
    assert resp.status_code == 200, resp.text
    assert list(resp.json()["members"]) == [params["members_asked"]]  # exp3 asks one


def test_error_cases(gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = split
    infer_json(gateway, x[300:302], id="err-1")
    infer_json(gateway, x[302:303])  # no id: nothing to join to later

    def expect(model: str, body: object, status: int, *words: str) -> None:
        resp = feedback(gateway, model, body)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert all(w in error for w in words), error

    expect("nope", {"id": "err-1", "label": 1}, 404, "nope")
    expect("logreg", {"id": "err-1", "label": 1}, 400, "not an ensemble")
    expect("digits", {"id": "never-sent", "label": 1}, 404, "never-sent")
    expect("digits", b"{not json", 400, "JSON")
    expect("digits", {"label": 1}, 400, "id")
    expect("digits", {"id": "err-1"}, 400, "label")
    expect("digits", {"id": "err-1", "label": 1}, 400, "2 row(s)", "1 label(s)")
    expect("digits", {"id": "err-1", "label": [1, 42]}, 400, "42", "not a class")
    expect("digits", {"id": "err-1", "label": ["1", 2]}, 400, "'1'")
    good = {"id": "err-1", "label": y[300:302].tolist()}
    assert feedback(gateway, "digits", good).status_code == 200  # errors did not consume it
    expect("digits", good, 409, "err-1", "already")

    wrong_method = httpx.get(f"{gateway.http_url}/v2/models/digits/feedback", timeout=10)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]

    counts = {
        labels["outcome"]: v
        for labels, v in metrics(gateway)["ensemble_feedback_total"]
        if labels["ensemble"] == "digits"
    }
    assert counts["duplicate"] == 1
    assert counts["unknown_id"] == 1
    assert counts["invalid"] == 6


def test_feedback_windows_are_config_fields() -> None:
    schema = json.loads((ROOT / "configs" / "schema.json").read_text())
    server = schema["$defs"]["ServerConfig"]["properties"]
    assert server["feedback_window"]["default"] == 10_000
    assert server["feedback_accuracy_window"]["default"] == 200
