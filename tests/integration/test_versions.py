"""Versions and rollouts through a real gateway: versioned routes over HTTP and gRPC (real
tritonclient clients), Triton's repository load and unload guarded by the admin token, no
request lost while models are unloaded and loaded under load, and canaries decided by the
evidence of feedback labels: a deliberately worse version rolled back, a better one promoted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from loadtest.rollout import degraded_copy
from tests.helpers import labelled, scrape
from tests.integration.conftest import array_input
from tests.integration.process import ZOO, GatewayProcess, Traffic, start_from_config, zoo_member

pytestmark = pytest.mark.integration
ADMIN = "versions-admin-token"
FEEDBACK = "versions-feedback-token"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def worse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """mlp_small with noise on its weights: right on about 63% of the test split."""
    path = tmp_path_factory.mktemp("worse") / "worse.onnx"
    return path, degraded_copy(ZOO / "mlp_small.onnx", path, noise=1.5, seed=0)


@pytest.fixture(scope="module")
def gw(
    zoo_dir: Path, worse: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    path, digest = worse
    clf = {
        **zoo_member("mlp_small"),
        "name": "clf",
        "versions": [
            {"version": "2", "model": str(ZOO / "forest.onnx")},
            {"version": "3", "model": str(path), "sha256": digest},
        ],
        "default_version": "2",
    }
    doc = {"ensembles": [{"name": "digits", "members": [zoo_member("logreg"), clf]}]}
    env = {"ENSEMBLE_ADMIN_TOKEN": ADMIN}
    proc = start_from_config(doc, tmp_path_factory.mktemp("gw"), env)
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def labels(doc: dict[str, Any]) -> list[int]:
    return next(o for o in doc["outputs"] if o["name"] == "label")["data"]


def test_each_version_answers_on_its_route(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = test_split
    body = {"inputs": [array_input(x[:50])]}
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        meta = client.get("/v2/models/clf").json()
        assert meta["versions"] == ["1", "2", "3"]
        answers = {}
        for version in ("1", "2", "3"):
            reply = client.post(f"/v2/models/clf/versions/{version}/infer", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model_version"] == version
            answers[version] = labels(reply.json())
            own = client.post(f"/v2/models/clf/versions/{version}/infer", json=body)
            assert labels(own.json()) == answers[version]
        assert answers["1"] != answers["3"]  # different models answer
        plain = client.post("/v2/models/clf/infer", json=body).json()
        assert plain["model_version"] == "2"  # the pinned default
        assert labels(plain) == answers["2"]
        missing = client.post("/v2/models/clf/versions/9/infer", json=body)
        assert missing.status_code == 404
        assert "available: 1, 2, 3" in missing.json()["error"]
        ready = client.get("/v2/models/clf/versions/3/ready")
        assert ready.status_code == 200
        card = client.get("/v2/models/clf/versions/2/config").json()["parameters"]
        assert card["version"]["string_value"] == "2"
        forest = json.loads((ZOO / "forest.card.json").read_text())
        assert card["sha256"]["string_value"] == forest["sha256"]
        assert float(card["card_accuracy"]["string_value"]) == round(forest["test_accuracy"], 4)
        index = {(e["name"], e["version"]): e for e in client.post("/v2/repository/index").json()}
        assert index[("clf", "2")]["reason"] == "serving"
        assert index[("clf", "3")]["state"] == "READY"
        ensemble = client.post("/v2/models/digits/infer", json=body).json()
        assert ensemble["parameters"]["versions"] == "clf:2"
    grpc = grpcclient.InferenceServerClient(gw.grpc_target)
    inputs = [grpcclient.InferInput("input", [50, 64], "FP32")]
    inputs[0].set_data_from_numpy(x[:50])
    result = grpc.infer("clf", inputs, model_version="3")
    assert result.get_response().model_version == "3"
    assert result.as_numpy("label").tolist() == answers["3"]
    assert grpc.get_model_metadata("clf", "1").versions == ["1", "2", "3"]
    with pytest.raises(InferenceServerException, match="no version"):
        grpc.infer("clf", inputs, model_version="7")
    metrics = scrape(gw.http_url)
    assert 'ensemble_member_calls_total{member="clf:3"' in metrics
    assert 'ensemble_version_traffic_share{member="clf",version="2"} 1.0' in metrics


def test_repository_load_and_unload_need_the_admin_token(gw: GatewayProcess) -> None:
    http = httpclient.InferenceServerClient(gw.http_target)
    with pytest.raises(InferenceServerException, match="admin token"):
        http.unload_model("logreg")
    with pytest.raises(InferenceServerException, match="wrong admin token"):
        http.unload_model("logreg", headers={"authorization": "Bearer nope"})
    grpc = grpcclient.InferenceServerClient(gw.grpc_target)
    with pytest.raises(InferenceServerException, match="admin token"):
        grpc.load_model("logreg")
    with pytest.raises(InferenceServerException, match="not supported"):
        http.load_model("logreg", headers=AUTH, config='{"backend": "onnxruntime"}')
    assert http.is_model_ready("logreg")


def test_unload_and_load_under_load_lose_no_request(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = test_split
    body = {"inputs": [array_input(x[:4])]}
    http = httpclient.InferenceServerClient(gw.http_target)
    grpc = grpcclient.InferenceServerClient(gw.grpc_target)
    with Traffic(gw.http_url, "digits", body, clients=2) as traffic:
        http.unload_model("logreg", headers=AUTH)  # tritonclient over HTTP
        assert not http.is_model_ready("logreg")
        index = {(e["name"], e["version"]): e for e in http.get_model_repository_index()}
        assert index[("logreg", "1")]["reason"] == "unloaded"
        grpc.load_model("logreg", headers=AUTH)  # and over gRPC
        assert grpc.is_model_ready("logreg")
        grpc.unload_model("logreg", headers=AUTH)  # each way over each protocol
        assert not grpc.is_model_ready("logreg")
        http.load_model("logreg", headers=AUTH)
        assert http.is_model_ready("logreg")
        with httpx.Client(base_url=gw.http_url, timeout=60, headers=AUTH) as client:
            one = {"parameters": {"version": "3"}}
            reply = client.post("/v2/repository/models/clf/unload", json=one)
            assert reply.status_code == 200, reply.text
            assert client.get("/v2/models/clf").json()["versions"] == ["1", "2"]
            gone = client.post("/v2/models/clf/versions/3/infer", json=body)
            assert gone.status_code == 404 and "not loaded" in gone.json()["error"]
            assert client.post("/v2/repository/models/clf/load", json=one).status_code == 200
            last = client.post("/v2/repository/models/nope/load")
            assert last.status_code == 404
        statuses = traffic.stop()
    assert len(statuses) > 20
    assert set(statuses) == {200}, sorted(set(statuses))
    assert http.get_model_metadata("clf")["versions"] == ["1", "2", "3"]


# -- rollouts decided by evidence -------------------------------------------------------------


def rollout(candidate: str, stable_model: dict[str, Any], versions: list[Any]) -> dict[str, Any]:
    return {
        **stable_model,
        "versions": versions,
        "rollout": {
            "version": candidate,
            "weight": 0.5,
            "min_calls": 20,
            "min_labels": 120,
            "max_latency_ratio": 20,  # loopback latency is noise here: accuracy decides
        },
    }


@pytest.fixture(scope="module")
def canary(
    zoo_dir: Path, worse: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    path, digest = worse
    worse_version = {"version": "2", "model": str(path), "sha256": digest}
    good_version = {"version": "2", "model": str(ZOO / "forest.onnx")}
    falling = rollout("2", zoo_member("mlp_small"), [worse_version])
    rising = rollout(
        "2", {"name": "rising", "model": str(path), "sha256": digest,
              "placement": [{"tier": "edge"}]}, [good_version],
    )  # fmt: skip
    mirrored = {
        **zoo_member("mlp_small"),
        "name": "mirrored",
        "versions": [worse_version],
        "rollout": {"version": "2", "mode": "shadow", "min_calls": 20},
    }
    doc = {
        "ensembles": [
            {"name": "digits", "members": [zoo_member("logreg"), falling, rising, mirrored]}
        ]
    }
    env = {"ENSEMBLE_ADMIN_TOKEN": ADMIN, "ENSEMBLE_FEEDBACK_TOKEN": FEEDBACK}
    proc = start_from_config(doc, tmp_path_factory.mktemp("canary"), env)
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def test_canaries_are_rolled_back_or_promoted_on_labels(
    canary: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    feedback = {"authorization": f"Bearer {FEEDBACK}"}
    sent = 0
    seen_versions: set[str] = set()
    background = {"inputs": [array_input(x[:4])]}
    with (
        Traffic(canary.http_url, "digits", background, clients=2) as traffic,
        httpx.Client(base_url=canary.http_url, timeout=30) as client,
    ):

        def phases() -> dict[str, str]:
            report = client.get("/admin/rollouts", headers=AUTH).json()["rollouts"]
            return {r["member"]: r["rollout"]["phase"] for r in report}

        for start in range(0, 8 * 150, 8):
            rows = slice(start % 352, start % 352 + 8)
            reply = client.post("/v2/models/digits/infer", json={"inputs": [array_input(x[rows])]})
            assert reply.status_code == 200, reply.text
            params = reply.json()["parameters"]
            seen_versions.update(params["versions"].split(","))
            label = client.post(
                "/v2/models/digits/feedback",
                json={"feedback_id": params["feedback_id"], "label": y[rows].tolist()},
                headers=feedback,
            )
            assert label.status_code == 200, label.text
            sent += 1
            if all(p != "running" for p in phases().values()):
                break
        assert phases() == {
            "mlp_small": "rolled_back", "rising": "promoted", "mirrored": "rolled_back"
        }, sent  # fmt: skip
        assert seen_versions >= {"mlp_small:1", "mlp_small:2", "rising:1", "rising:2"}
        assert "mirrored:2" not in seen_versions  # a shadow's answers are never returned
        assert "mirrored:1" in seen_versions
        report = {r["member"]: r for r in client.get("/admin/rollouts", headers=AUTH).json()[
            "rollouts"]}  # fmt: skip
        assert "accuracy" in report["mlp_small"]["rollout"]["reason"]
        shadow = report["mirrored"]["rollout"]
        assert "agreement" in shadow["reason"] and shadow["agreement"] < 0.9
        assert shadow["evidence"]["2"]["calls"] >= 20
        assert report["mlp_small"]["serving"] == "1" and report["rising"]["serving"] == "2"
        # After the decisions every unversioned call goes to the serving versions.
        after = client.post("/v2/models/digits/infer", json={"inputs": [array_input(x[:8])]})
        assert after.json()["parameters"]["versions"] == "mlp_small:1,rising:2,mirrored:1"
        # An operator cannot decide a rollout that is over.
        again = client.post("/admin/rollouts/rising", json={"action": "rollback"}, headers=AUTH)
        assert again.status_code == 400
        statuses = traffic.stop()
    assert set(statuses) == {200}, sorted(set(statuses))  # none lost through both decisions
    assert sent < 150
    metrics = scrape(canary.http_url)
    assert (
        'ensemble_rollout_decisions_total{decision="rollback",member="mlp_small",version="2"} 1.0'
        in metrics
    )
    assert 'ensemble_rollout_phase{member="rising",phase="promoted",version="2"} 1.0' in metrics
    assert "version 2 rolled back" in canary.log() and "version 2 promoted" in canary.log()
    # Each step is logged: the evidence as each measure got its sample or crossed its threshold.
    assert "member 'rising': version 2 against 1: " in canary.log()
    # The evidence each decision rested on, per version, on /metrics.
    for family in (
        "ensemble_rollout_calls",
        "ensemble_rollout_latency_p95_seconds",
        "ensemble_rollout_labelled_rows",
        "ensemble_rollout_accuracy",
    ):
        for version in ("1", "2"):
            value = labelled(metrics, family, member="rising", version=version)
            assert value is not None and value > 0, (family, version, value)
    agreement = labelled(metrics, "ensemble_rollout_agreement_ratio", member="mirrored")
    assert agreement == pytest.approx(shadow["agreement"], abs=0.05)
