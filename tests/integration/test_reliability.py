"""Failover, outlier ejection and contract violations through a real gateway.

The gateway serves members whose replicas fail or answer late on purpose (emulated faults in
the config); requests go over HTTP (httpx) and gRPC (tritonclient).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers import metric, scrape
from tests.integration.conftest import good_input
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
DEAD = {"probability": 1.0}
VERY_LATE = {"probability": 1.0, "delay_ms": 400}
EJECT_S = 0.6


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("reliability")
    config = {
        "tiers": {
            "edge": {"cost_per_request": 0.001},
            "cloud": {"cost_per_request": 0.01},
        },
        "outlier_detection": {
            "name": "consecutive_failures",
            "params": {"consecutive_failures": 3, "base_ejection_s": EJECT_S},
        },
        "ensembles": [
            {
                # forest's edge replica is dead; its cloud replica works.
                "name": "failover",
                "policy": "edge_first",
                "members": [
                    zoo_member(
                        "forest",
                        {"tier": "edge", "failures": DEAD},
                        {"tier": "cloud"},
                    )
                ],
            },
            {
                "name": "direct",
                "members": [
                    zoo_member("mlp_large", {"tier": "edge", "failures": DEAD}, {"tier": "cloud"})
                ],
            },
            {
                "name": "contracts",
                "policy": "plain",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("mlp_small", {"tier": "edge", "failures": DEAD}),
                    zoo_member("svm", {"tier": "cloud", "straggler": VERY_LATE}),
                ],
            },
        ],
        "policies": {
            "edge_first": {"routing": {"name": "tier_preference"}},
            "edge_first_no_retry": {
                "routing": {"name": "tier_preference"},
                "retry": {"name": "none"},
                "on_violation": "reject",
            },
            "plain": {"selection": {"name": "static", "params": {"members": ["logreg"]}}},
            "strict": {
                "selection": {"name": "static", "params": {"members": ["logreg"]}},
                "on_violation": "reject",
            },
            "alerting": {
                "selection": {"name": "static", "params": {"members": ["logreg"]}},
                "on_violation": "alert",
            },
            "dead_only": {
                "selection": {"name": "static", "params": {"members": ["mlp_small"]}},
                "on_violation": "reroute",
            },
            "slow_with_fallback": {
                "selection": {"name": "static", "params": {"members": ["svm"]}},
                "on_violation": "degrade",
                "fallback": "logreg",
            },
            "slow_strict": {
                "selection": {"name": "static", "params": {"members": ["svm"]}},
                "on_violation": "reject",
            },
        },
    }
    proc = start_from_config(config, tmp)
    yield proc
    assert proc.stop() == 0, proc.log()


def infer(client: httpx.Client, model: str, **parameters: object) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [good_input()], "parameters": parameters}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    return response.status_code, response.json()


def test_dead_replica_fails_over_then_is_ejected_and_probed(gw: GatewayProcess) -> None:
    ejected = 'ensemble_replica_ejected{member="forest",replica="edge/0",tier="edge"}'
    ejections = 'ensemble_replica_ejections_total{member="forest",replica="edge/0",tier="edge"}'
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        results = [infer(client, "failover") for _ in range(8)]
        assert all(status == 200 for status, _ in results), results
        # Every answer came from the cloud replica; the first calls got there by a retry.
        assert {doc["parameters"]["members_answered"] for _, doc in results} == {"forest@cloud"}
        retries = [int(doc["parameters"].get("retries", 0)) for _, doc in results]
        assert retries[:3] == [1, 1, 1]  # three consecutive failures eject the edge replica
        assert sum(retries[3:]) == 0  # ... and routing skips it from then on
        assert results[0][1]["parameters"]["cost"] == pytest.approx(0.011)  # edge + cloud try
        assert results[-1][1]["parameters"]["cost"] == pytest.approx(0.01)
        metrics = scrape(gw.http_url)
        assert metric(metrics, ejected) == 1.0
        assert metric(metrics, ejections) == 1.0
        assert metric(metrics, 'ensemble_retries_total{member="forest"') >= 3

        # After the ejection, one half-open probe goes to the edge replica; it fails, so the
        # replica is ejected again (for longer), and the request still succeeds by a retry.
        time.sleep(EJECT_S + 0.1)
        assert metric(scrape(gw.http_url), ejected) == 0.0  # half-open: routable for one probe
        status, doc = infer(client, "failover")
        assert status == 200 and doc["parameters"]["retries"] == 1
        assert metric(scrape(gw.http_url), ejections) == 2.0
        status, doc = infer(client, "failover")
        assert status == 200 and "retries" not in doc["parameters"]


def test_a_member_addressed_directly_fails_over_too(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        results = [infer(client, "mlp_large") for _ in range(6)]
    assert [status for status, _ in results] == [200] * 6, results
    assert {doc["parameters"]["members_answered"] for _, doc in results} == {"mlp_large@cloud"}
    assert metric(scrape(gw.http_url), 'ensemble_retries_total{member="mlp_large"') >= 1


def test_without_retries_a_failure_is_the_answer(gw: GatewayProcess) -> None:
    # Wait out the ejection so the dead edge replica is tried first again.
    time.sleep(2 * EJECT_S + 0.2)
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "failover", policy="edge_first_no_retry")
    assert status == 502, doc
    assert "availability" in doc["error"] and "forest" in doc["error"]


def test_alert_answers_and_counts_an_unmet_accuracy(gw: GatewayProcess) -> None:
    alerts = 'ensemble_contract_violations_total{action="alert"'
    before = metric(scrape(gw.http_url), alerts, 0.0)  # none yet: no such series yet
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "contracts", policy="alerting", min_accuracy=0.9999)
    assert status == 200
    params = doc["parameters"]
    assert params["degraded"] is True and params["violations"] == "accuracy"
    assert 0.5 < params["estimated_accuracy"] < 0.9999
    metrics = scrape(gw.http_url)
    assert metric(metrics, alerts) == before + 1
    assert metric(metrics, 'ensemble_degraded_answers_total{ensemble="contracts"}') >= 1


def test_reject_refuses_an_unmet_accuracy_on_both_protocols(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "contracts", policy="strict", min_accuracy=0.9999)
        assert status == 422
        assert "min_accuracy" in doc["error"] and "estimated" in doc["error"]
        status, doc = infer(client, "contracts", policy="strict", min_accuracy=0.5)
        assert status == 200 and "degraded" not in doc["parameters"]
    client_grpc = grpcclient.InferenceServerClient(gw.grpc_target)
    x = grpcclient.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.asarray(good_input()["data"], np.float32).reshape(1, 64))
    with pytest.raises(InferenceServerException) as err:
        client_grpc.infer("contracts", [x], parameters={"policy": "strict", "min_accuracy": 0.9999})
    assert "FAILED_PRECONDITION" in str(err.value.status())
    assert "min_accuracy" in str(err.value.message())
    client_grpc.close()


def test_cost_budget_violation_is_rejected(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "contracts", policy="strict", max_cost=0.0001)
    assert status == 422 and "max_cost" in doc["error"]


def test_reroute_asks_the_members_left_out(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "contracts", policy="dead_only", timeout=2_000_000)
    assert status == 200, doc
    params = doc["parameters"]
    assert params["rerouted"] is True
    assert params["members_asked"].startswith("mlp_small,")
    assert "logreg@edge" in params["members_answered"]
    assert "availability" in params["violations"]


def test_degrade_answers_from_the_fallback_before_the_deadline(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        start = time.perf_counter()
        # 200 ms: room for the fallback on a busy machine, far below the 400 ms straggler.
        status, doc = infer(client, "contracts", policy="slow_with_fallback", timeout=200_000)
        elapsed = time.perf_counter() - start
        assert status == 200, doc
        params = doc["parameters"]
        assert params["fallback"] == "logreg" and params["degraded"] is True
        assert params["members_answered"] == "logreg@edge"
        assert params["deadline_met"] is False and "deadline" in params["violations"]
        assert elapsed < 0.35  # the 400 ms straggler was not waited for

        status, doc = infer(client, "contracts", policy="slow_strict", timeout=100_000)
        assert status == 504 and "deadline" in doc["error"]
