"""The `r3e` policy in a real gateway: a member whose edge placement is full bursts onto the cloud
(a placement that starts at zero replicas), every request answered meanwhile, and the cloud goes
back to zero once the burst is over; replica-seconds and their price are accounted per tier."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import array_input
from tests.integration.process import Traffic, start_from_config, zoo_member

pytestmark = pytest.mark.integration


def replicas(text: str, tier: str) -> float | None:
    found = re.search(
        rf'ensemble_autoscaler_replicas\{{kind="current",member="logreg",tier="{tier}"\}} (\S+)',
        text,
    )
    return float(found.group(1)) if found else None


def test_r3e_bursts_to_the_cloud_and_scales_it_back_to_zero(zoo_dir: Path, tmp_path: Path) -> None:
    device = {"service_ms": 40, "concurrency": 1}  # 25 calls/s per replica
    config = {
        "tiers": {
            "edge": {"max_replicas": 1},
            "cloud": {"cost_per_replica_hour": 3600.0, "link": {"emulate": True, "delay_ms": 2}},
        },
        "ensembles": [
            {
                "name": "e",
                "members": [
                    zoo_member(
                        "logreg",
                        {"tier": "edge", "device": device},
                        {"tier": "cloud", "replicas": {"min": 0, "max": 3}, "device": device},
                    )
                ],
            }
        ],
        "autoscaling": {
            "interval_s": 0.25,
            "window_s": 1,
            "policy": {
                "name": "r3e",
                "params": {
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 1,
                    "scale_to_zero_after_s": 2,
                    "spare": 0,
                    "lookahead_s": 0,
                },
            },
        },
    }
    gw = start_from_config(config, tmp_path)
    try:
        seen = None
        deadline = time.monotonic() + 10
        while seen is None and time.monotonic() < deadline:  # the loop's first tick
            seen = replicas(httpx.get(f"{gw.http_url}/metrics", timeout=10).text, "cloud")
            time.sleep(0.1)
        assert seen == 0.0  # the burst tier starts empty
        body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
        burst = 0.0
        with Traffic(gw.http_url, "e", body, clients=6) as traffic:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and burst < 1:
                burst = replicas(httpx.get(f"{gw.http_url}/metrics", timeout=10).text, "cloud") or 0
                time.sleep(0.25)
            time.sleep(1)  # calls flow through the cloud for a while
        statuses = traffic.statuses
        assert burst >= 1, gw.log()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        # The burst is over: the cloud gives its replicas back, down to zero.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
            if replicas(metrics, "cloud") == 0.0:
                break
            time.sleep(0.25)
        assert replicas(metrics, "cloud") == 0.0, gw.log()
        spent = re.search(r'ensemble_spend_total\{kind="replicas",tier="cloud"\} (\S+)', metrics)
        assert spent is not None and float(spent.group(1)) > 0  # one unit per replica-second
        held = re.search(
            r'ensemble_replica_seconds_total\{member="logreg",tier="cloud"\} (\S+)', metrics
        )
        assert held is not None and float(spent.group(1)) == pytest.approx(float(held.group(1)))
    finally:
        assert gw.stop() == 0, gw.log()
    log = gw.log()
    # The edge is full, or at its max and over its p95 SLO: either sends replicas to the cloud.
    assert re.search(r"autoscaler: logreg@cloud 0 -> [1-3] replicas \(.*(burst|on cloud)", log), log
    assert "scale to zero" in log, log
