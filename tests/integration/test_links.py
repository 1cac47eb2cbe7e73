"""Emulated links through a real gateway: the cloud link's delay shows in latency; partitioning
the cloud through the admin API (and the load test's fault event) leaves the edge answering,
flagged degraded; healing it brings the cloud members back without a restart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest import faults
from loadtest.faults import FaultContext, FaultEvent
from tests.helpers import metric, scrape, wait_for
from tests.integration.conftest import good_input
from tests.integration.process import (
    ZOO,
    GatewayProcess,
    start_from_config,
    start_replica,
    zoo_member,
)

pytestmark = pytest.mark.integration
TOKEN = "link-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DELAY_MS = 30
TIMER_SLACK_S = 0.001
"""How early a leg's sleep may end against ``perf_counter``: uvloop's timers keep time in
whole milliseconds, so one armed 0.9 ms into a millisecond fires 0.9 ms early."""


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("links")
    replica = start_replica(ZOO / "svm.onnx", tmp / "svm.log")
    config = {
        "tiers": {
            "edge": {},
            "cloud": {"link": {"emulate": True, "delay_ms": DELAY_MS}},
        },
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("forest"),
                    zoo_member("mlp_small", {"tier": "cloud"}),
                    zoo_member(
                        "svm",
                        {
                            "tier": "cloud",
                            "backend": "oip-http",
                            "endpoints": [replica.http_url],
                            "health_check_interval_s": 0.2,
                            "health_check_timeout_s": 0.5,
                            "unhealthy_threshold": 1,
                        },
                    ),
                ],
            }
        ],
    }
    proc = start_from_config(config, tmp, env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    yield proc
    code = proc.stop()
    replica.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def infer(client: httpx.Client, model: str) -> tuple[int, dict[str, Any], float]:
    start = time.perf_counter()
    response = client.post(f"/v2/models/{model}/infer", json={"inputs": [good_input()]})
    return response.status_code, response.json(), time.perf_counter() - start


def cloud_answered(doc: dict[str, Any]) -> bool:
    return "@cloud" in doc["parameters"]["members_answered"]


def test_the_cloud_links_delay_shows_in_latency(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        infer(client, "mlp_small")  # warm up
        edge = min(infer(client, "logreg")[2] for _ in range(5))
        cloud = min(infer(client, "mlp_small")[2] for _ in range(5))
        status, doc, whole = infer(client, "digits")
        assert status == 200 and doc["parameters"]["completeness"] == 1.0
        assert "degraded" not in doc["parameters"]
        assert cloud >= 2 * (DELAY_MS / 1e3 - TIMER_SLACK_S) > edge  # paid both ways
        assert whole >= 2 * (DELAY_MS / 1e3 - TIMER_SLACK_S)
        metrics = scrape(gw.http_url)
        assert metric(metrics, 'ensemble_link_delay_seconds{tier="cloud"}') == DELAY_MS / 1e3
        assert metric(metrics, 'ensemble_link_partitioned{tier="cloud"}') == 0.0
        # Where the calls' time went: the link both ways, the session's run, the wait for it.
        stage = 'ensemble_member_stage_duration_seconds_{}{{member="{}",stage="{}",tier="{}"}}'
        links = metric(metrics, stage.format("count", "mlp_small", "link", "cloud"))
        assert links >= 7  # the warm-up, five calls, the ensemble's
        spent = metric(metrics, stage.format("sum", "mlp_small", "link", "cloud"))
        assert spent >= links * 2 * (DELAY_MS / 1e3 - TIMER_SLACK_S)
        assert metric(metrics, stage.format("count", "logreg", "compute", "edge")) >= 6
        assert metric(metrics, stage.format("count", "logreg", "queue", "edge")) >= 6
        compute = metric(metrics, stage.format("sum", "logreg", "compute", "edge"))
        assert 0 < compute < 6 * DELAY_MS / 1e3  # a logistic regression is quick
        # One session run per call here (each request alone); under load a run serves several.
        runs = metric(metrics, 'ensemble_member_runs_total{member="logreg",tier="edge"}')
        calls = 'ensemble_member_calls_total{{member="{}",outcome="success",tier="{}"}}'
        assert 6 <= runs <= metric(metrics, calls.format("logreg", "edge"))


def test_the_links_admin_api_checks_its_token_and_input(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        assert client.get("/admin/links").status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert client.put("/admin/links/cloud", json={}, headers=wrong).status_code == 403
        doc = client.get("/admin/links", headers=AUTH).json()["links"]
        assert doc["cloud"]["emulate"] and doc["cloud"]["delay_ms"] == DELAY_MS
        assert not doc["edge"]["emulate"]
        answer = client.put("/admin/links/moon", json={"partitioned": True}, headers=AUTH)
        assert answer.status_code == 404 and "unknown tier" in answer.json()["error"]
        answer = client.put("/admin/links/edge", json={"partitioned": True}, headers=AUTH)
        assert answer.status_code == 409 and "emulate" in answer.json()["error"]
        answer = client.put("/admin/links/cloud", json={"loss": 2}, headers=AUTH)
        assert answer.status_code == 400 and "loss" in answer.json()["error"]
        answer = client.put("/admin/links/cloud", json={"seed": 2}, headers=AUTH)
        assert answer.status_code == 400 and "seed" in answer.json()["error"]
        answer = client.put("/admin/links/cloud", content=b"[1]", headers=AUTH)
        assert answer.status_code == 400
        answer = client.post("/admin/links/cloud", headers=AUTH)
        assert answer.status_code == 405
        assert client.get("/admin/links", headers=AUTH).json()["links"]["cloud"]["overrides"] == {}


class Load:
    """Requests to the ensemble, one after another in a thread, every answer kept."""

    def __init__(self, url: str) -> None:
        self.answers: list[tuple[float, int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not self._stop.is_set():
                status, doc, took = infer(client, "digits")
                self.answers.append((took, status, doc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_a_partitioned_cloud_leaves_the_edge_answering_degraded_then_heals(
    gw: GatewayProcess,
) -> None:
    load = Load(gw.http_url)
    try:
        with httpx.Client(base_url=gw.http_url, timeout=30) as client:
            wait_for(lambda: len(load.answers) >= 5, "requests flow", 5.0)
            answer = client.put("/admin/links/cloud", json={"partitioned": True}, headers=AUTH)
            assert answer.status_code == 200 and answer.json()["partitioned"] is True
            cut = len(load.answers)
            wait_for(lambda: len(load.answers) >= cut + 10, "answers while partitioned", 5.0)
            assert client.get("/v2/models/mlp_small/ready").status_code == 503  # at once
            wait_for(
                lambda: client.get("/v2/models/svm/ready").status_code == 503,
                "the remote cloud replica's health checks fail",
                5.0,
            )
            assert client.get("/v2/models/digits/ready").status_code == 200  # the edge answers
            assert client.get("/v2/health/ready").status_code == 503  # not every model is
            metrics = scrape(gw.http_url)
            assert metric(metrics, 'ensemble_model_ready{model="svm"}') == 0.0
            assert metric(metrics, 'ensemble_link_partitioned{tier="cloud"}') == 1.0
            partitioned = load.answers[cut + 2 :]
            answer = client.put("/admin/links/cloud", json={"partitioned": False}, headers=AUTH)
            assert answer.status_code == 200
            healed_at = time.monotonic()
            mark = len(load.answers)
            wait_for(
                lambda: any(cloud_answered(d) for _, _, d in load.answers[mark:]),
                "cloud members answer again",
                5.0,
            )
            wait_for(
                lambda: client.get("/v2/health/ready").status_code == 200,
                "every model is ready",
                5.0,
            )
            full = len(load.answers) + 1  # the one in flight may have started before
            wait_for(lambda: len(load.answers) > full, "answers after every member is ready", 5.0)
            assert time.monotonic() - healed_at < 5
            assert client.delete("/admin/links/cloud", headers=AUTH).status_code == 200
            metrics = scrape(gw.http_url)
            assert metric(metrics, 'ensemble_degraded_answers_total{ensemble="digits"}') > 0
            failures = 'ensemble_link_failures_total{kind="partitioned",tier="cloud"}'
            assert metric(metrics, failures) > 0
    finally:
        load.stop()
    assert all(status == 200 for _, status, _ in load.answers)  # nothing lost, no errors
    assert all(took < 5 for took, _, _ in load.answers)  # nothing hangs
    for _, _, doc in partitioned:
        params = doc["parameters"]
        assert params["degraded"] is True and "availability" in params["violations"]
        assert not cloud_answered(doc) and "@edge" in params["members_answered"]
    for _, _, doc in load.answers[full:]:  # the whole ensemble answers again
        assert doc["parameters"]["completeness"] == 1.0 and "degraded" not in doc["parameters"]


def test_the_partition_fault_event_cuts_and_restores_and_reloads_keep_it(
    gw: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENSEMBLE_ADMIN_TOKEN", TOKEN)
    params = faults.validate_params("partition", {"tier": "cloud", "duration_s": 4})
    start = time.monotonic()
    ctx = FaultContext(None, elapsed=lambda: time.monotonic() - start, gateway_url=gw.http_url)

    def cloud_link(client: httpx.Client) -> dict[str, Any]:
        doc: dict[str, Any] = client.get("/admin/links", headers=AUTH).json()["links"]["cloud"]
        return doc

    async def main() -> None:
        hook = asyncio.create_task(
            faults.create_hook("partition").apply(FaultEvent(0, "partition", params), ctx)
        )
        with httpx.Client(base_url=gw.http_url, timeout=30) as client:
            await asyncio.to_thread(wait_for, lambda: cloud_link(client)["partitioned"], "cut")
            # A hot reload keeps the runtime state of the links (the network's, not the config's).
            reload = await asyncio.to_thread(client.put, "/admin/config", headers=AUTH)
            assert reload.status_code == 200, reload.text
            assert cloud_link(client)["partitioned"] is True
            status, doc, _ = await asyncio.to_thread(infer, client, "digits")
            assert status == 200 and doc["parameters"]["degraded"] is True
            await hook
            link = cloud_link(client)
            assert link["partitioned"] is False and link["overrides"] == {}

    asyncio.run(main())
    assert [m.message for m in ctx.marks] == [
        "link to cloud: partitioned=True for 4 s",
        "link to cloud restored",
    ]
