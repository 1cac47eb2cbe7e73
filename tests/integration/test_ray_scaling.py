"""The ray provisioner on a real private Ray: the control loop sets a `ray` placement's replica
count through Serve's custom autoscaling policy (`follow_gateway`): under load Serve runs more
replica actors, they go again once the load is gone, and no request fails meanwhile. A placement
with `replicas.min: 0` starts with no Serve replica at all (the member answers from its other
tier) and is not woken by health checks."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import wait_for
from tests.integration.conftest import array_input
from tests.integration.process import GatewayProcess, Traffic, start_from_config, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CURRENT = 'ensemble_autoscaler_replicas{kind="current",member="mlp_large",tier="cloud"}'


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray's workers are the raylet's children, not the gateway's)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True)
        children = {int(p) for p in out.stdout.split()} - found
        found |= children
        todo.extend(children)
    return found


def serve_replicas(gateway: GatewayProcess, deployment: str) -> int:
    """Ray Serve replica actors of ``deployment`` in this gateway's private Ray (processes; one
    left over from an earlier test's Ray, shutting down, is not counted)."""
    out = subprocess.run(
        ["pgrep", "-f", f"ServeReplica:ensemble:{deployment}"], capture_output=True, text=True
    ).stdout
    return len({int(p) for p in out.split()} & descendants(gateway.proc.pid))


def test_control_loop_scales_a_ray_deployment_up_and_down(zoo_dir: Path, tmp_path: Path) -> None:
    ray = {"tier": "cloud", "backend": "ray", "health_check_interval_s": 0.2}
    config = {
        "ensembles": [
            {
                "name": "e",
                "members": [
                    zoo_member(
                        "mlp_large",
                        {
                            **ray,
                            "replicas": {"min": 1, "max": 2},
                            "ray": {"num_cpus": 0.1},
                            "straggler": {"probability": 1.0, "delay_ms": 150},
                        },
                    ),
                    zoo_member(
                        "logreg",
                        {"tier": "edge"},
                        {**ray, "replicas": {"min": 0, "max": 1}, "ray": {"num_cpus": 0.1}},
                    ),
                ],
            }
        ],
        "autoscaling": {
            "interval_s": 0.25,
            "window_s": 1,
            "policy": {
                "name": "target_inflight",
                "params": {"upscale_delay_s": 0, "downscale_delay_s": 1},
            },
        },
        "policies": {"default": {"on_violation": "degrade"}},
    }
    gw = start_from_config(config, tmp_path)
    try:
        assert serve_replicas(gw, "mlp_large-cloud-0") == 1
        assert serve_replicas(gw, "logreg-cloud-0") == 0  # starts scaled to zero
        metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
        assert 'ensemble_replica_ready{member="logreg",replica="cloud/0",tier="cloud"} 0.0' in (
            metrics
        )
        body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
        with Traffic(gw.http_url, "e", body, clients=6) as traffic:
            wait_for(
                lambda: serve_replicas(gw, "mlp_large-cloud-0") == 2,
                "Serve to run a second replica",
                60,
                interval_s=0.25,
                detail=gw.log,
            )
            time.sleep(1)  # calls flow through both replicas for a while
        statuses = traffic.statuses
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        # The idle deployment shrinks back to its minimum once downscale_delay_s has passed.
        wait_for(
            lambda: f"{CURRENT} 1.0" in httpx.get(f"{gw.http_url}/metrics", timeout=10).text,
            "the autoscaler to want 1 replica again",
            30,
            interval_s=0.25,
            detail=gw.log,
        )
        wait_for(
            lambda: serve_replicas(gw, "mlp_large-cloud-0") == 1,
            "Serve to stop the second replica",
            60,
            interval_s=0.25,
            detail=gw.log,
        )
        metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
        # Health checks never woke the placement scaled to zero.
        assert serve_replicas(gw, "logreg-cloud-0") == 0
        assert 'ensemble_replica_seconds_total{member="mlp_large",tier="cloud"}' in metrics
    finally:
        assert gw.stop(timeout_s=60) == 0, gw.log()
    assert "autoscaler: mlp_large@cloud 1 -> 2 replicas (" in gw.log(), gw.log()
    assert "autoscaler: mlp_large@cloud 2 -> 1 replicas (" in gw.log(), gw.log()
    assert "not applied" not in gw.log()
