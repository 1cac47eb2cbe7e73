"""Routing among a member's replicas through a real gateway, chosen by the policy profile."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import good_input
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("routing")
    config = {
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    # two replicas of one member: a straggler on the edge, a fast one in the cloud
                    zoo_member(
                        "forest",
                        {"tier": "edge", "straggler": {"probability": 1.0, "delay_ms": 300}},
                        {"tier": "cloud"},
                    ),
                ],
            }
        ],
        "policies": {
            "ewma": {"routing": {"name": "peak_ewma"}},
            "nearest": {"routing": {"name": "tier_preference"}},
        },
    }
    proc = start_from_config(config, tmp)
    yield proc
    assert proc.stop() == 0, proc.log()


def forest_tiers(gw: GatewayProcess, n: int, **parameters: object) -> Counter[str]:
    tiers: Counter[str] = Counter()
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        for _ in range(n):
            body = {"inputs": [good_input()], "parameters": parameters}
            answered = client.post("/v2/models/digits/infer", json=body).json()["parameters"]
            for item in answered["members_answered"].split(","):
                member, tier = item.split("@")
                if member == "forest":
                    tiers[tier] += 1
    return tiers


def test_round_robin_alternates(gw: GatewayProcess) -> None:
    tiers = forest_tiers(gw, 10)
    assert tiers == Counter({"edge": 5, "cloud": 5})


def test_peak_ewma_learns_to_avoid_the_straggler(gw: GatewayProcess) -> None:
    tiers = forest_tiers(gw, 20, policy="ewma")
    assert tiers["cloud"] >= 18, tiers  # at most one probe of the slow replica, then avoided


def test_tier_preference_goes_to_the_edge_first(gw: GatewayProcess) -> None:
    assert forest_tiers(gw, 4, policy="nearest") == Counter({"edge": 4})


def test_contract_tier_pins_the_replica(gw: GatewayProcess) -> None:
    assert forest_tiers(gw, 4, policy="ewma", tier="cloud") == Counter({"cloud": 4})
