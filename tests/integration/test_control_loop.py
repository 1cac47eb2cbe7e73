"""The control loop in a real gateway: under load it gives the busy in-process placement more
replicas (they take calls at once), says so in /metrics and the log, and no request fails."""

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
CURRENT = 'ensemble_autoscaler_replicas{kind="current",member="logreg",tier="edge"}'


def test_busy_placement_scales_up_without_failing_a_request(zoo_dir: Path, tmp_path: Path) -> None:
    slow = {
        "tier": "edge",
        "replicas": {"min": 1, "max": 4},
        "straggler": {"probability": 1.0, "delay_ms": 300},
    }
    config = {
        "ensembles": [{"name": "e", "members": [zoo_member("logreg", slow)]}],
        "autoscaling": {
            "interval_s": 0.2,
            "window_s": 1,
            "policy": {"name": "target_inflight", "params": {"upscale_delay_s": 0}},
        },
    }
    gw = start_from_config(config, tmp_path)
    try:
        body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
        seen, text = "", ""
        with Traffic(gw.http_url, "e", body, clients=8) as traffic:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
                seen = next((line for line in text.splitlines() if line.startswith(CURRENT)), "")
                if seen.endswith(" 4.0"):
                    break
                time.sleep(0.2)
            time.sleep(1)  # calls flow through the new replicas for a while
        statuses = traffic.statuses
        assert seen.endswith(" 4.0"), seen  # 8 in flight / 2 per replica, capped at max 4
        ready = [line for line in text.splitlines() if line.startswith("ensemble_replica_ready{")]
        assert sum('member="logreg"' in line for line in ready) == 4, ready
        assert statuses and set(statuses) == {200}
    finally:
        assert gw.stop() == 0, gw.log()
    assert re.search(r"autoscaler: logreg@edge [1-3] -> 4 replicas \(", gw.log()), gw.log()
    assert "not applied" not in gw.log()
