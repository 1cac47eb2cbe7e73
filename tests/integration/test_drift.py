"""Data that drifts, through a real gateway: clean test rows keep the input drift score low;
rows with a fifth of their pixels dropped push it over the threshold (a warning in the log);
a profile with uncertainty thresholds marks unsure answers and escalates them to the other
members, and the same profile without escalation only marks them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import metric, scrape
from tests.integration.conftest import array_input
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
WINDOW = 100
UNSURE = {"entropy": 0.3, "input_outliers": 0.05}


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("drift")
    config = {
        "ensembles": [
            {
                "name": "digits",
                "policy": "escalate",
                "members": [zoo_member(m) for m in ("logreg", "forest", "mlp_small", "svm")],
                "drift": {"window": WINDOW, "threshold": 0.1},
            }
        ],
        "policies": {
            "escalate": {
                "selection": {"name": "static", "params": {"members": ["logreg"]}},
                "uncertainty": UNSURE,
            },
            "plain": {
                "selection": {"name": "static", "params": {"members": ["logreg"]}},
                "uncertainty": {**UNSURE, "escalate": False},
            },
        },
    }
    proc = start_from_config(config, tmp)
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def infer(client: httpx.Client, row: np.ndarray, policy: str) -> dict[str, Any]:
    body = {"inputs": [array_input(row[None, :])], "parameters": {"policy": policy}}
    response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200, response.text
    params: dict[str, Any] = response.json()["parameters"]
    return params


def test_drift_is_scored_logged_and_unsure_answers_escalated(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_split[0]
    rng = np.random.default_rng(0)
    dropped = (x * (rng.random(x.shape) > 0.2)).astype(np.float32)
    drift = 'ensemble_input_drift{ensemble="digits"}'
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        clean = [infer(client, row, "escalate") for row in x[:WINDOW]]
        assert metric(scrape(gw.http_url), drift) < 0.1
        assert "input drift" not in gw.log()
        plain = [infer(client, row, "plain") for row in dropped[:WINDOW]]
        escalated = [infer(client, row, "escalate") for row in dropped[:WINDOW]]
    assert metric(scrape(gw.http_url), drift) >= 0.1
    assert "ensemble digits: input drift" in gw.log()
    unsure = [p for p in escalated if p["uncertain"]]
    assert sum(p["uncertain"] for p in clean) < len(unsure)  # drifted rows are less certain
    assert unsure and all(p["escalated"] and "forest" in p["members_asked"] for p in unsure)
    assert all(p["members_asked"] == "logreg" for p in escalated if not p["uncertain"])
    assert [p["uncertain"] for p in plain] == [p["uncertain"] for p in escalated]  # same rows
    assert not any("escalated" in p for p in plain)
    assert all(p["members_asked"] == "logreg" for p in plain)
    counted = metric(scrape(gw.http_url), 'ensemble_uncertain_answers_total{ensemble="digits"')
    assert counted == sum(p["uncertain"] for p in clean + plain + escalated)
