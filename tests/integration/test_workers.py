"""`ensemble serve --workers 2` through real processes: both workers serve the same ports, one
/metrics counts them all, a label reaches whichever worker gave the answer and teaches exp4
exactly as one worker learns, a reload applies in every worker or in none, a worker that dies
is restarted, SIGTERM drains all and exits 0."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import metric, scrape, wait_for
from tests.integration.process import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.integration
ZOO = ROOT / "models" / "digits"
MEMBERS = ("logreg", "forest", "mlp_small")
FEEDBACK = "workers-feedback-token"
ADMIN = "workers-admin-token"
ENV = {"ENSEMBLE_FEEDBACK_TOKEN": FEEDBACK, "ENSEMBLE_ADMIN_TOKEN": ADMIN}
ROWS = range(100, 160)  # rows where the members err on different rows: the weights drift apart
WEIGHT_TOLERANCE = 1e-9
"""exp4's weights over 2 workers against 1 worker on the same labels in the same order: the
same transitions applied in the same order, so equal up to float rounding."""


def _config() -> dict[str, Any]:
    return {
        "server": {"feedback_window": 1000},
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
        "policies": {"learn": {"selection": {"name": "exp4", "params": {"eta": 0.5}}}},
        "tiers": {"edge": {}, "cloud": {"link": {"emulate": True, "delay_ms": 5}}},
        "model_zoo": {"dir": str(ZOO)},
    }


def _start(tmp: Path, *extra: str) -> GatewayProcess:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config()))
    return start_gateway(path, tmp / "gateway.log", *extra, env=ENV)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = _start(tmp_path_factory.mktemp("workers2"), "--workers", "2")
    yield gw
    assert gw.stop() == 0
    assert "Traceback" not in gw.log(), gw.log()


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = _start(tmp_path_factory.mktemp("workers1"))
    yield gw
    assert gw.stop() == 0


def workers(gw: GatewayProcess) -> list[psutil.Process]:
    """The worker processes under the supervisor (not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process(gw.proc.pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # killed: not reaped, or gone
            pass
    return found


def infer(url: str, row: np.ndarray) -> dict[str, Any]:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": row.tolist()}]}  # fmt: skip
    # A new connection each time: the workers share the listening socket, so both answer.
    response = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def label(url: str, feedback_id: str, value: int) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/digits/feedback",
        json={"feedback_id": feedback_id, "label": value},
        headers={"authorization": f"Bearer {FEEDBACK}"},
        timeout=30,
    )


def weights(gw: GatewayProcess) -> dict[str, float]:
    families = text_string_to_metric_families(scrape(gw.http_url))
    return {
        s.labels["member"]: s.value
        for f in families
        if f.name == "ensemble_selection_weight"
        for s in f.samples
    }


def test_both_workers_serve_grpc_and_http_and_metrics_count_them_all(
    two: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = test_split
    before = metric(scrape(two.http_url), 'ensemble_requests_total{model="digits"', 0.0)
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each, not one shared
    clients = [
        grpcclient.InferenceServerClient(two.grpc_target, channel_args=own) for _ in range(12)
    ]
    try:
        for client in clients:  # 12 channels: the kernel spreads them over both workers
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x[:1])
            result = client.infer("digits", [tensor])
            assert result.as_numpy("label") is not None
        port = two.grpc_port
        holding = [
            w.pid
            for w in workers(two)
            if any(
                c.laddr.port == port and c.status == "ESTABLISHED" for c in w.net_connections("tcp")
            )
        ]
        assert len(workers(two)) == 2 and len(holding) == 2
    finally:
        for client in clients:
            client.close()
    for row in x[:8]:
        infer(two.http_url, row)
    after = metric(scrape(two.http_url), 'ensemble_requests_total{model="digits"', 0.0)
    assert after - before == 20  # one /metrics, every worker's requests


def test_labels_reach_the_worker_that_answered_and_teach_exp4_as_one_worker(
    one: GatewayProcess, two: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    keepers = set()
    for row in ROWS:
        for gw in (one, two):
            doc = infer(gw.http_url, x[row])
            feedback_id = doc["parameters"]["feedback_id"]
            if gw is two:
                keepers.add(feedback_id.partition(".")[0])
            response = label(gw.http_url, feedback_id, int(y[row]))
            assert response.status_code == 200, response.text
            if gw is two and row == ROWS[0]:  # a second label for it: 409 wherever it lands
                assert label(gw.http_url, feedback_id, int(y[row])).status_code == 409
    assert keepers == {"0", "1"}  # both workers answered, and each answer learned
    wait_for(lambda: len(weights(two)) == 3, timeout_s=5, what="weights in every worker")
    learned_one, learned_two = weights(one), weights(two)
    assert max(learned_one.values()) - min(learned_one.values()) > 0.01  # they did move
    assert learned_two == pytest.approx(learned_one, abs=WEIGHT_TOLERANCE)


def test_a_reload_applies_in_every_worker_or_in_none(two: GatewayProcess) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    bad = _config()
    bad["policies"]["learn"]["selection"]["name"] = "no_such_policy"
    refused = httpx.put(
        f"{two.http_url}/admin/config", content=yaml.safe_dump(bad), headers=admin, timeout=120
    )
    assert refused.status_code == 400, refused.text
    assert set(refused.json()["workers"]) == {"0", "1"}
    assert httpx.get(f"{two.http_url}/v2/models/digits2", timeout=10).status_code == 404
    more = _config()
    logreg = {"name": "logreg2", "model": str(ZOO / "logreg.onnx"), "placement": [{"tier": "edge"}]}
    more["ensembles"].append({"name": "digits2", "policy": "learn", "members": [logreg]})
    applied = httpx.put(
        f"{two.http_url}/admin/config", content=yaml.safe_dump(more), headers=admin, timeout=120
    )
    assert applied.status_code == 200, applied.text
    assert applied.json()["workers"] == {"0": "applied", "1": "applied"}
    for _ in range(8):  # new connections: whichever worker answers serves the new config
        assert httpx.get(f"{two.http_url}/v2/models/digits2", timeout=10).status_code == 200


def test_a_link_changed_through_one_worker_changes_in_every_worker(two: GatewayProcess) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    url = f"{two.http_url}/admin/links"
    answer = httpx.put(f"{url}/cloud", json={"delay_ms": 40, "partitioned": True}, headers=admin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["overrides"] == {"delay_ms": 40.0, "partitioned": True}
    bad = httpx.put(f"{url}/cloud", json={"loss": 2}, headers=admin)
    assert bad.status_code == 400  # refused before any worker changes
    for _ in range(8):  # new connections: both workers, each with the change
        doc = httpx.get(url, headers=admin, timeout=10).json()["links"]["cloud"]
        assert doc["overrides"] == {"delay_ms": 40.0, "partitioned": True}
    assert metric(scrape(two.http_url), 'ensemble_link_partitioned{tier="cloud"}') == 1
    assert httpx.delete(f"{url}/cloud", headers=admin).status_code == 200
    for _ in range(8):
        doc = httpx.get(url, headers=admin, timeout=10).json()["links"]["cloud"]
        assert doc["overrides"] == {}


def test_a_dead_worker_is_restarted_with_the_learned_state_and_sigterm_drains_all(
    tmp_path: Path, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    gw = _start(tmp_path, "--workers", "2")
    try:
        for row in ROWS[:30]:  # learn something first: the restarted worker must get it
            doc = infer(gw.http_url, x[row])
            assert label(gw.http_url, doc["parameters"]["feedback_id"], int(y[row])).is_success
        wait_for(lambda: len(weights(gw)) == 3, timeout_s=5, what="weights")
        learned = weights(gw)
        assert min(learned.values()) < 1 / 3 - 0.01  # merged as the largest copy: a worker
        # that had lost them would show 1/3 for this member
        victim = workers(gw)[1]
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(
            lambda: len(workers(gw)) == 2 and victim.pid not in [w.pid for w in workers(gw)],
            timeout_s=60,
            what="a new worker in place of the killed one",
        )
        wait_for(
            lambda: httpx.get(f"{gw.http_url}/metrics", timeout=5).status_code == 200,
            timeout_s=60,
            what="metrics from both workers again",
        )
        for row in x[:6]:
            infer(gw.http_url, row)
        assert "exited with code -9; restarting it" in gw.log()
        assert weights(gw) == pytest.approx(learned, abs=WEIGHT_TOLERANCE)
    finally:
        assert gw.stop() == 0
    assert "Traceback" not in gw.log(), gw.log()
