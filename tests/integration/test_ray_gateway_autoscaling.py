"""`ensemble serve --ray-address` with `ray.gateway_replicas` between 1 and 2: Ray Serve's
autoscaling adds a gateway replica under the gateway's own load and removes it once the load is
gone, with no request lost (a two-node `ray.cluster_utils.Cluster` on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import wait_for
from tests.integration.process import (
    ZOO,
    GatewayProcess,
    RayCluster,
    Traffic,
    start_gateway,
    zoo_member,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "autoscaled"
ENV = {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def gw(
    cluster: RayCluster, zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    doc = {
        "model_zoo": {"dir": str(ZOO)},
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
        "ray": {
            "app": APP,
            "gateway_num_cpus": 0.5,
            "gateway_replicas": {
                "min": 1,
                "max": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 1,
                "downscale_delay_s": 5,
                "look_back_period_s": 2,
            },
        },
    }
    tmp = tmp_path_factory.mktemp("autoscaled")
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    gateway = start_gateway(
        path, tmp / "gw.log", "--ray-address", cluster.address, env=ENV, timeout_s=300
    )
    yield gateway
    if gateway.proc.poll() is None:
        assert gateway.stop(timeout_s=90) == 0, gateway.log()


def _replicas(cluster: RayCluster) -> int:
    state = cluster.ask("hub", APP)
    assert isinstance(state, dict), state
    return len(state["replicas"])


def test_serve_adds_a_gateway_replica_under_load_and_removes_it_after(
    cluster: RayCluster, gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    assert _replicas(cluster) == 1
    x, _ = test_split
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": x[0].tolist()}]}  # fmt: skip
    with Traffic(gw.http_url, "digits", body, clients=6) as traffic:
        grew = wait_for(
            lambda: _replicas(cluster) == 2,
            what="Serve adding a second gateway replica under load",
            timeout_s=120,
            interval_s=0.5,
            detail=gw.log,
        )
        statuses = traffic.stop()
    assert len(statuses) > 50 and set(statuses) == {200}, sorted(set(statuses))
    shrank = wait_for(
        lambda: _replicas(cluster) == 1,
        what="Serve removing the idle gateway replica",
        timeout_s=120,
        interval_s=0.5,
        detail=gw.log,
    )
    print(f"grew after {grew:.1f} s of load, shrank {shrank:.1f} s after it")
