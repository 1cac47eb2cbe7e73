"""The control loop in a real gateway: under load it decides more replicas for the busy
placement and says so in /metrics and the log (the static provisioner applies nothing yet)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import array_input
from tests.integration.process import start_from_config, zoo_member

pytestmark = pytest.mark.integration
DESIRED = 'ensemble_autoscaler_replicas{kind="desired",member="logreg",tier="edge"}'


def test_busy_placement_gets_a_scale_up_decision(zoo_dir: Path, tmp_path: Path) -> None:
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
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=gw.http_url, timeout=30) as http:
                while not stop.is_set():
                    assert http.post("/v2/models/e/infer", json=body).status_code == 200

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        seen = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
            seen = next((line for line in text.splitlines() if line.startswith(DESIRED)), "")
            if seen.endswith(" 4.0"):
                break
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
        assert seen.endswith(" 4.0"), seen  # 8 in flight / 2 per replica, capped at max 4
        assert (
            'ensemble_autoscaler_replicas{kind="current",member="logreg",tier="edge"} 1.0' in text
        )
    finally:
        assert gw.stop() == 0, gw.log()
    assert "autoscaler: logreg@edge 1 -> 4 replicas" in gw.log()
