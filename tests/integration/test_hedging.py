"""Hedged requests through a real gateway: a second copy beats a straggler replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import labelled
from tests.integration.conftest import good_input
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
LATE = {"probability": 0.3, "delay_ms": 300}


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("hedging")
    config = {
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member(
                        "forest",
                        {"tier": "edge", "replicas": {"min": 2, "max": 2}, "straggler": LATE},
                    ),
                ],
            }
        ],
        "policies": {
            "hedged": {
                "hedging": {
                    "name": "percentile",
                    "params": {"budget": 1.0, "burst": 100, "min_delay_ms": 5, "max_delay_ms": 20},
                }
            },
        },
    }
    proc = start_from_config(config, tmp)
    yield proc
    assert proc.stop() == 0, proc.log()


def slow_share(gw: GatewayProcess, n: int, **parameters: object) -> tuple[float, int]:
    slow = hedges = 0
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            body = {"inputs": [good_input()], "parameters": parameters}
            doc = client.post("/v2/models/digits/infer", json=body).json()
            slow += time.perf_counter() - start > 0.25
            hedges += int(doc["parameters"].get("hedges", 0))
    return slow / n, hedges


def test_hedging_cuts_the_share_of_slow_answers(gw: GatewayProcess) -> None:
    slow_share(gw, 20, policy="hedged")  # warm-up: p95 needs a few samples per replica
    plain, plain_hedges = slow_share(gw, 60)
    hedged, sent = slow_share(gw, 60, policy="hedged")
    assert plain_hedges == 0
    assert sent > 0
    assert plain > 0.15  # ~30% of calls are late without hedging
    assert hedged < plain / 2, (plain, hedged)  # both copies late: ~9%
    metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    won = labelled(metrics, "ensemble_hedges_total", member="forest", outcome="won")
    assert won is not None and won >= 1
