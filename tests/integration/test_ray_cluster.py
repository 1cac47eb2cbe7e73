"""`ensemble serve --ray-address` on a two-node Ray cluster (`ray.cluster_utils.Cluster` on
loopback: an `edge` node and a `cloud` node): the gateway and its Ray members become one Serve
application, each deployment on the node offering its tier's resource; clients reach the
gateway unchanged; SIGTERM deletes the application."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from tests.integration.process import (
    ROOT,
    ZOO,
    GatewayProcess,
    RayCluster,
    start_gateway,
    zoo_member,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "edgecloud"
X = np.random.default_rng(3).uniform(0, 16, (3, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def gw(
    cluster: RayCluster, zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("ray-app")
    config = {
        "model_zoo": {"dir": str(ZOO)},
        "ray": {"app": APP, "gateway_tier": "edge", "gateway_num_cpus": 0.5},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("mlp_large", {"tier": "cloud", "backend": "ray"}),
                    zoo_member("forest", {"tier": "edge", "backend": "ray"}),
                ],
            }
        ],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    gateway = start_gateway(
        path, tmp / "gw.log", "--ray-address", cluster.address, env={"RAY_AUTH_MODE": "disabled"}
    )
    yield gateway
    if gateway.proc.poll() is None:
        gateway.stop(timeout_s=60)


def test_gateway_and_members_run_on_their_tiers_nodes(
    cluster: RayCluster, gw: GatewayProcess
) -> None:
    placed = cluster.ask("placement", APP, "gateway", "mlp_large-cloud-0", "forest-edge-0")
    assert placed == {
        "gateway": ["edge"],
        "mlp_large-cloud-0": ["cloud"],
        "forest-edge-0": ["edge"],
    }


def test_a_member_replica_skips_a_call_with_no_time_left(
    cluster: RayCluster, gw: GatewayProcess
) -> None:
    # The gateway sends the time left, which the replica counts on its own clock from the call's
    # arrival: none left, and the work is for nobody; time left or no limit, and it runs.
    skipped = cluster.ask("call", APP, "mlp_large-cloud-0", "0")
    assert skipped["error"] == "DeadlineExceeded", skipped  # type: ignore[index]
    assert "time ran out" in skipped["message"]  # type: ignore[index]
    assert cluster.ask("call", APP, "mlp_large-cloud-0", "30") == {"shape": [1, 10]}
    assert cluster.ask("call", APP, "forest-edge-0", "none") == {"shape": [1, 10]}


def test_clients_reach_the_gateway_in_the_cluster(gw: GatewayProcess) -> None:
    with httpclient.InferenceServerClient(gw.http_target) as client:
        assert client.is_server_ready()
        tensor = httpclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("digits", [tensor])
        answered = result.get_response()["parameters"]["members_answered"]
        assert answered == "logreg@edge,mlp_large@cloud,forest@edge"
        labels = result.as_numpy("label")
        assert labels is not None and labels.shape == (3,)
    with grpcclient.InferenceServerClient(gw.grpc_target) as client:
        tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        member = client.infer("mlp_large", [tensor])
        np.testing.assert_array_equal(member.as_numpy("label").shape, (3,))
        bad = grpcclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
        with pytest.raises(Exception, match="63"):
            client.infer("mlp_large", [bad])


def test_sigterm_deletes_the_application(cluster: RayCluster, gw: GatewayProcess) -> None:
    assert APP in cluster.ask("apps")  # type: ignore[operator]
    assert gw.stop(timeout_s=90) == 0, gw.log()
    assert APP not in cluster.ask("apps")  # type: ignore[operator]
    assert "Traceback" not in gw.log(), gw.log()


def test_a_tier_no_node_offers_fails_clearly_instead_of_hanging(
    cluster: RayCluster, tmp_path: Path
) -> None:
    config = {
        "model_zoo": {"dir": str(ZOO)},
        "tiers": {"edge": {}, "gpu": {}},
        "ray": {"app": "nowhere", "deploy_timeout_s": 8},
        "ensembles": [
            {"name": "e", "members": [zoo_member("logreg", {"tier": "gpu", "backend": "ray"})]}
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ensemble.cli",
            "serve",
            str(path),
            "--ray-address",
            cluster.address,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert done.returncode == 1, done.stderr
    assert "is not running after 8 s" in done.stderr and "gpu" in done.stderr, done.stderr
    assert "nowhere" not in cluster.ask("apps")  # type: ignore[operator]
