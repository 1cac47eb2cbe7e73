"""Feedback through a real gateway: labels joined by the feedback id each answer carries teach
exp4 and track accuracy; the feedback token guards it all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
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
TOKEN = "feedback-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _config() -> dict[str, object]:
    return {
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


def _serve(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> GatewayProcess:
    tmp = tmp_path_factory.mktemp("feedback")
    path = tmp / "feedback.yaml"
    path.write_text(yaml.safe_dump(_config()))
    return start_gateway(path, tmp / "gw.log", env=env)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = _serve(tmp_path_factory, {"ENSEMBLE_FEEDBACK_TOKEN": TOKEN})
    yield gw
    assert gw.stop() == 0
    assert "Traceback" not in gw.log(), gw.log()


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The same gateway without a feedback token (set empty: an inherited one is ignored)."""
    gw = _serve(tmp_path_factory, {"ENSEMBLE_FEEDBACK_TOKEN": ""})
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


def feedback(
    gw: GatewayProcess, model: str, body: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{gw.http_url}/v2/models/{model}/feedback",
        content=content,
        headers=AUTH if headers is None else headers,
        timeout=10,
    )


def infer_json(gw: GatewayProcess, x: np.ndarray, **extra: object) -> dict[str, Any]:
    body = {
        "inputs": [array_input(x)],
        **extra,
    }
    resp = httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def feedback_id(doc: dict[str, Any]) -> str:
    value = doc["parameters"]["feedback_id"]
    assert isinstance(value, str) and len(value) >= 22
    return value


def outcomes(gw: GatewayProcess, ensemble: str = "digits") -> dict[str, float]:
    """``ensemble_feedback_total`` of one ``ensemble`` label value, by outcome."""
    return {
        labels["outcome"]: v
        for labels, v in metrics(gw).get("ensemble_feedback_total", [])
        if labels["ensemble"] == ensemble
    }


def test_feedback_tracks_accuracy_and_teaches_exp4(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    client = httpclient.InferenceServerClient(gateway.http_target, network_timeout=30)
    for i in range(FIRST_ROW, FIRST_ROW + N_FEEDBACK):
        inp = httpclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        result = client.infer("digits", [inp], request_id=f"req-{i}")
        answer = result.get_response()
        assert answer["id"] == f"req-{i}"  # the client's id is echoed as before
        if i == FIRST_ROW:  # exp4 starts with equal weights once it has seen the members
            assert weights(gateway) == pytest.approx(dict.fromkeys(MEMBERS, 1 / 3))
        resp = feedback(gateway, "digits", {"feedback_id": feedback_id(answer), "label": int(y[i])})
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
    doc = infer_json(gateway, x[200:204])
    body = {"feedback_id": feedback_id(doc), "label": y[200:204].tolist()}
    resp = feedback(gateway, "digits", body)
    assert resp.status_code == 200, resp.text
    shares = resp.json()["members"]
    assert set(shares) == set(MEMBERS) and all(0.0 <= s <= 1.0 for s in shares.values())

    doc = infer_json(gateway, x[210:211], parameters={"policy": "bandit"})
    params = doc["parameters"]
    assert isinstance(params, dict) and params["policy"] == "bandit"
    resp = feedback(gateway, "digits", {"feedback_id": feedback_id(doc), "label": int(y[210])})
    assert resp.status_code == 200, resp.text
    assert list(resp.json()["members"]) == [params["members_asked"]]  # exp3 asks one


def test_error_cases(gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = split
    fid = feedback_id(infer_json(gateway, x[300:302], id="err-1"))
    before = outcomes(gateway)

    def expect(model: str, body: object, status: int, *words: str) -> None:
        resp = feedback(gateway, model, body)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert all(w in error for w in words), error

    expect("nope", {"feedback_id": fid, "label": 1}, 404, "nope")
    expect("logreg", {"feedback_id": fid, "label": 1}, 400, "not an ensemble")
    expect("digits", {"feedback_id": "never-issued", "label": 1}, 404, "never-issued")
    expect("digits", {"id": "err-1", "label": 1}, 400, "feedback_id")  # client ids join nothing
    expect("digits", b"{not json", 400, "JSON")
    expect("digits", {"label": 1}, 400, "feedback_id")
    expect("digits", {"feedback_id": fid}, 400, "label")
    expect("digits", {"feedback_id": fid, "label": 1}, 400, "2 row(s)", "1 label(s)")
    expect("digits", {"feedback_id": fid, "label": [1, 42]}, 400, "42", "not a class")
    expect("digits", {"feedback_id": fid, "label": ["1", 2]}, 400, "'1'")
    good = {"feedback_id": fid, "label": y[300:302].tolist()}
    assert feedback(gateway, "digits", good).status_code == 200  # errors did not consume it
    expect("digits", good, 409, fid, "already")

    wrong_method = httpx.get(f"{gateway.http_url}/v2/models/digits/feedback", timeout=10)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]

    after = outcomes(gateway)
    assert after["duplicate"] - before.get("duplicate", 0) == 1
    assert after["unknown_id"] - before.get("unknown_id", 0) == 1
    assert after["invalid"] - before.get("invalid", 0) == 7


def test_wrong_or_missing_token_is_refused_and_changes_nothing(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    doc = infer_json(gateway, x[310:311])
    fid = feedback_id(doc)
    wrong_label = int((y[310] + 1) % 10)  # what a poisoner would send
    learned, before, before_unknown = weights(gateway), outcomes(gateway), outcomes(gateway, "")
    body = {"feedback_id": fid, "label": wrong_label}
    for headers, status in (
        ({}, 401),
        ({"authorization": "Basic dXNlcjpwdw=="}, 401),
        ({"authorization": "Bearer"}, 401),
        ({"authorization": "Bearer not-the-token"}, 403),
        ({"authorization": f"Bearer {TOKEN}x"}, 403),
    ):
        resp = feedback(gateway, "digits", body, headers)
        assert resp.status_code == status, (headers, resp.text)
        assert "feedback token" in resp.json()["error"]
        if status == 401:
            assert resp.headers["www-authenticate"] == 'Bearer realm="ensemble-feedback"'
    # An unknown model is refused the same way: the route says nothing before the token.
    assert feedback(gateway, "nope", body, {}).status_code == 401
    assert weights(gateway) == learned
    after = outcomes(gateway)
    assert after["unauthorized"] - before.get("unauthorized", 0) == 5
    refused_unknown = outcomes(gateway, "")["unauthorized"] - before_unknown.get("unauthorized", 0)
    assert refused_unknown == 1  # counted, but an unknown name never becomes a label value
    assert after.get("accepted") == before.get("accepted")
    # The answer is still there for the real label.
    real = {"feedback_id": fid, "label": int(y[310])}
    assert feedback(gateway, "digits", real).status_code == 200


def test_two_clients_reusing_one_request_id_each_join_their_own_answer(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    # Client A (exp4, all members) and client B (exp3, one member) both send id "shared".
    a = infer_json(gateway, x[320:322], id="shared")
    b = infer_json(gateway, x[330:331], id="shared", parameters={"policy": "bandit"})
    assert a["id"] == b["id"] == "shared"
    assert feedback_id(a) != feedback_id(b)
    resp_b = feedback(gateway, "digits", {"feedback_id": feedback_id(b), "label": int(y[330])})
    assert resp_b.status_code == 200, resp_b.text
    assert list(resp_b.json()["members"]) == [b["parameters"]["members_asked"]]
    resp_a = feedback(
        gateway, "digits", {"feedback_id": feedback_id(a), "label": y[320:322].tolist()}
    )
    assert resp_a.status_code == 200, resp_a.text
    assert set(resp_a.json()["members"]) == set(MEMBERS)
    # B's label cannot land on A's answer (a batch of 2) nor be posted twice.
    again = feedback(gateway, "digits", {"feedback_id": feedback_id(b), "label": int(y[330])})
    assert again.status_code == 409


def test_grpc_answers_carry_a_feedback_id_too(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    client = grpcclient.InferenceServerClient(gateway.grpc_target)
    try:
        inp = grpcclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[340:341])
        result = client.infer("digits", [inp], request_id="grpc-1")
    finally:
        client.close()
    response = result.get_response(as_json=True)
    assert response["id"] == "grpc-1"
    fid = response["parameters"]["feedback_id"]["string_param"]
    assert len(fid) >= 22
    resp = feedback(gateway, "digits", {"feedback_id": fid, "label": int(y[340])})
    assert resp.status_code == 200, resp.text


def test_the_store_is_exported(
    gateway: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    infer_json(gateway, split[0][344:360])  # 3 members x 16 rows: 48 bytes of classes
    scraped = metrics(gateway)
    (answers,) = scraped["ensemble_feedback_store_answers"]
    (size,) = scraped["ensemble_feedback_store_bytes"]
    assert answers[1] >= 1 and 400 * answers[1] + 48 <= size[1] < 64 * 1024 * 1024


def test_without_a_token_feedback_is_disabled(
    closed: GatewayProcess, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    doc = infer_json(closed, x[100:101], id="req-1")
    assert doc["id"] == "req-1"
    assert "feedback_id" not in doc["parameters"]  # nothing issued, nothing kept
    learned = weights(closed)
    for headers in ({}, AUTH):
        body = {"feedback_id": "anything", "label": int(y[100])}
        resp = feedback(closed, "digits", body, headers)
        assert resp.status_code == 403, resp.text
        assert "ENSEMBLE_FEEDBACK_TOKEN" in resp.json()["error"]
    assert weights(closed) == learned
    scraped = metrics(closed)
    assert scraped["ensemble_feedback_store_answers"][0][1] == 0
    assert outcomes(closed) == {"unauthorized": 2}
    # A client's own request id was never a way in either.
    resp = feedback(closed, "digits", {"id": "req-1", "label": int(y[100])}, AUTH)
    assert resp.status_code == 403


def test_feedback_windows_are_config_fields() -> None:
    schema = json.loads((ROOT / "configs" / "schema.json").read_text())
    server = schema["$defs"]["ServerConfig"]["properties"]
    assert server["feedback_window"]["default"] == 10_000
    assert server["feedback_accuracy_window"]["default"] == 200
