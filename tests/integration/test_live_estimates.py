"""Live estimates through a real gateway: logreg on the edge, svm and mlp_large behind an
emulated 20 ms link. With a 15 ms deadline `slo_greedy` asks the edge alone and meets every
deadline, where the card-based choice asks the cloud and misses; with room it asks the cloud;
when the link slows down, the next request already leaves the cloud out, and when it heals
the cloud is asked again; /metrics shows what selection expects of each member and tier; a
cascade starts on the edge, stops on confident rows and escalates the others to the cloud,
counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import metric, scrape
from tests.integration.conftest import array_input, good_input
from tests.integration.process import ZOO, GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
TOKEN = "estimates-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
THRESHOLD = 0.9


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("estimates")
    config = {
        "tiers": {
            "edge": {"cost_per_request": 0.00001},
            "cloud": {
                "cost_per_request": 0.0001,
                "link": {"emulate": True, "delay_ms": 20},
            },
        },
        "ensembles": [
            {
                "name": "digits",
                "policy": "live",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("svm", {"tier": "cloud"}),
                    zoo_member("mlp_large", {"tier": "cloud"}),
                ],
            }
        ],
        "policies": {
            "live": {"selection": {"name": "slo_greedy"}},
            "card": {"selection": {"name": "slo_greedy", "params": {"estimates": "card"}}},
            "cascade": {"selection": {"name": "cascade", "params": {"threshold": THRESHOLD}}},
        },
    }
    proc = start_from_config(config, tmp, env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def infer(
    client: httpx.Client, deadline_ms: int, policy: str = "live", x: np.ndarray | None = None
) -> dict[str, Any]:
    body = {
        "inputs": [good_input() if x is None else array_input(x)],
        "parameters": {"timeout": deadline_ms * 1000, "policy": policy},
    }
    response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200, response.text
    params: dict[str, Any] = response.json()["parameters"]
    return params


def test_a_tight_deadline_is_met_from_the_edge_where_the_card_based_choice_misses(
    gw: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        live = [infer(client, 15) for _ in range(30)]
        card = [infer(client, 15, "card") for _ in range(10)]
    assert all(p["deadline_met"] for p in live), live
    assert {p["members_answered"] for p in live} == {"logreg@edge"}
    assert all("svm" in p["members_asked"] for p in card)
    assert sum(not p["deadline_met"] for p in card) >= 9, card


def test_with_room_the_cloud_is_asked_and_a_slower_link_turns_it_away_at_once(
    gw: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        roomy = [infer(client, 100) for _ in range(5)]
        assert all("@cloud" in p["members_answered"] and p["deadline_met"] for p in roomy)
        slow = client.put("/admin/links/cloud", json={"delay_ms": 60}, headers=AUTH)
        assert slow.status_code == 200, slow.text
        try:
            after = [infer(client, 100) for _ in range(5)]  # a 120 ms round trip: no fit
            assert {p["members_answered"] for p in after} == {"logreg@edge"}
            assert all(p["deadline_met"] for p in after)
        finally:
            healed = client.delete("/admin/links/cloud", headers=AUTH)
            assert healed.status_code == 200, healed.text
        back = infer(client, 100)
        assert "@cloud" in back["members_answered"] and back["deadline_met"]


def test_the_metrics_show_each_placements_estimate(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        for _ in range(10):
            infer(client, 100)
    text = scrape(gw.http_url)
    svm = 'member="svm",tier="cloud"'
    assert metric(text, f"ensemble_placement_round_trip_seconds{{{svm}}}") == 0.040
    assert metric(text, f"ensemble_placement_estimate_calls{{{svm}}}") >= 8
    assert metric(text, f"ensemble_placement_error_ratio{{{svm}}}") == 0.0
    expected = "ensemble_placement_expected_latency_seconds"
    assert 0.040 < metric(text, f'{expected}{{member="svm",quantile="0.5",tier="cloud"}}') < 0.1
    assert metric(text, f'{expected}{{member="logreg",quantile="0.99",tier="edge"}}') < 0.04


def test_the_cascade_starts_on_the_edge_and_escalates_only_unsure_rows(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_split[0][:60]
    session = ort.InferenceSession(str(ZOO / "logreg.onnx"), providers=["CPUExecutionProvider"])
    confidence = session.run(["probabilities"], {"input": x})[0].max(axis=1)
    clear = np.abs(confidence - THRESHOLD) > 0.01  # rows far enough from the threshold
    assert clear.sum() > 40 and (confidence[clear] < THRESHOLD).sum() >= 3
    escalations = 'ensemble_escalations_total{ensemble="digits"}'
    before = metric(scrape(gw.http_url), escalations, 0.0)
    extra = 0
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        for row, sure, keep in zip(x, confidence >= THRESHOLD, clear, strict=True):
            params = infer(client, 200, "cascade", row[None, :])
            extra += params.get("stages", 1) - 1
            answered = params["members_answered"].split(",")
            assert answered[0] == "logreg@edge", params
            if keep and sure:
                assert answered == ["logreg@edge"] and "stages" not in params, params
            elif keep:
                assert params["stages"] >= 2 and answered[1].endswith("@cloud"), params
    assert extra >= (confidence[clear] < THRESHOLD).sum()
    assert metric(scrape(gw.http_url), escalations) - before == extra
