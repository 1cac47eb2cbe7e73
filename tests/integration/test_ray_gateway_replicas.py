"""`ensemble serve --ray-address` with two gateway replicas on a two-node Ray cluster
(`ray.cluster_utils.Cluster` on loopback): both answer, through Serve's proxy (HTTP) and the
gateway's gRPC port; a label sent through either teaches the one profile; one replica leads the
control loop, and killing it under load loses only requests in flight on it while the other
takes over and Serve replaces it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from tests.helpers import wait_for
from tests.integration.process import (
    ZOO,
    GatewayProcess,
    RayCluster,
    Traffic,
    start_gateway,
    zoo_member,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "gateways"
FEEDBACK = "replicas-feedback-token"
ENV = {"RAY_AUTH_MODE": "disabled", "ENSEMBLE_FEEDBACK_TOKEN": FEEDBACK}
MEMBERS = ("logreg", "forest", "mlp_small")
ROWS = range(100, 140)


def _config(ray: dict[str, Any] | None) -> dict[str, Any]:
    """The gateway's config; its replicas serve gRPC on the uvicorn stack (test_ray_cluster.py
    covers grpcio on Ray)."""
    doc: dict[str, Any] = {
        "model_zoo": {"dir": str(ZOO)},
        "server": {"grpc_stack": "uvicorn"},
        "ensembles": [
            {"name": "digits", "policy": "learn", "members": [zoo_member(m) for m in MEMBERS]}
        ],
        "policies": {"learn": {"selection": {"name": "exp4", "params": {"eta": 0.5}}}},
    }
    if ray is not None:
        doc["ray"] = ray
    return doc


def _start(tmp: Path, doc: dict[str, Any], *extra: str) -> GatewayProcess:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return start_gateway(path, tmp / "gw.log", *extra, env=ENV, timeout_s=300)


@pytest.fixture(scope="module")
def gw(
    cluster: RayCluster, zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    ray = {"app": APP, "gateway_num_cpus": 0.5, "gateway_replicas": {"min": 2, "max": 2}}
    gateway = _start(
        tmp_path_factory.mktemp("replicas"), _config(ray), "--ray-address", cluster.address
    )
    yield gateway
    if gateway.proc.poll() is None:
        assert gateway.stop(timeout_s=90) == 0, gateway.log()


def _body(row: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": row.tolist()}]}  # fmt: skip


def _learn(url: str, x: np.ndarray, y: np.ndarray) -> set[str]:
    """Answers and their labels for ROWS, a new connection each; the feedback ids' prefixes."""
    keepers = set()
    for row in ROWS:
        answer = httpx.post(f"{url}/v2/models/digits/infer", json=_body(x[row]), timeout=30)
        assert answer.status_code == 200, answer.text
        feedback_id = answer.json()["parameters"]["feedback_id"]
        keepers.add(feedback_id.partition(".")[0])
        label = httpx.post(
            f"{url}/v2/models/digits/feedback",
            json={"feedback_id": feedback_id, "label": int(y[row])},
            headers={"authorization": f"Bearer {FEEDBACK}"},
            timeout=30,
        )
        assert label.status_code == 200, label.text
    return keepers


def _weights(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("ensemble_selection_weight{"):
            member = line.split('member="', 1)[1].split('"', 1)[0]
            out[member] = float(line.rsplit(" ", 1)[1])
    return out


def test_two_gateway_replicas_on_two_nodes_both_answer(
    cluster: RayCluster, gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    assert cluster.ask("nodes", APP, "gateway", "16") == ["cloud", "edge"]
    state = cluster.ask("hub", APP)
    assert isinstance(state, dict) and len(state["replicas"]) == 2
    x, _ = test_split
    for row in x[:4]:  # through Serve's proxy
        answer = httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=_body(row), timeout=30)
        assert answer.status_code == 200, answer.text
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    for _ in range(4):
        with grpcclient.InferenceServerClient(gw.grpc_target, channel_args=own) as client:
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x[:1])
            assert client.infer("digits", [tensor]).as_numpy("label") is not None


def test_labels_through_either_replica_teach_one_profile(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = test_split
    keepers = _learn(gw.http_url, x, y)
    assert keepers == {"0", "1"}, keepers  # both replicas answered, and every label joined
    one = _start(tmp_path, _config(None))  # one process, the same labels in the same order
    try:
        _learn(one.http_url, x, y)
        expected = _weights(one.http_url)
    finally:
        assert one.stop() == 0
    assert max(expected.values()) - min(expected.values()) > 0.01
    assert _weights(gw.http_url) == pytest.approx(expected, abs=1e-9)


def test_killing_the_leader_under_load_loses_only_its_requests_and_another_leads(
    cluster: RayCluster, gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    state = cluster.ask("hub", APP)
    assert isinstance(state, dict)
    leader = state["leader"]
    victim = state["replicas"][str(leader)]
    x, _ = test_split
    with Traffic(gw.http_url, "digits", _body(x[0]), clients=2) as traffic:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)

        def new_leader() -> bool:
            now = cluster.ask("hub", APP)
            return isinstance(now, dict) and now["leader"] not in (None, leader)

        took = wait_for(new_leader, what="another replica leading", timeout_s=30)
        wait_for(
            lambda: len(cluster.ask("hub", APP)["replicas"]) == 2,  # type: ignore[index]
            what="Serve replacing the killed replica",
            timeout_s=120,
        )
        time.sleep(1.0)
    statuses = traffic.stop()
    failed = [s for s in statuses if s != 200]
    assert len(statuses) > 50 and len(failed) <= 4, (len(statuses), failed)
    assert took < 15
