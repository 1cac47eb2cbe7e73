"""The gateway's Serve application built from its import path (`ensemble.serve_app:app`), as
KubeRay's RayService deploys it (deploy/kubernetes/rayservice.yaml), on a real two-node Ray
cluster on loopback: it answers through Serve's proxy with a member on the `cloud` node, and
its hub is a detached actor."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import good_input
from tests.integration.process import ZOO, RayCluster, free_port, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP = "declared"


def test_the_application_deploys_by_import_path(
    cluster: RayCluster, zoo_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    doc = {
        "server": {"host": "127.0.0.1", "grpc_port": 0},
        "model_zoo": {"dir": str(ZOO), "build_if_missing": False},
        "ray": {"app": APP, "gateway_num_cpus": 0.5},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    zoo_member(
                        "mlp_small", {"tier": "cloud", "backend": "ray", "ray": {"num_cpus": 0.25}}
                    ),
                ],
            }
        ],
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    port = free_port()
    apps = cluster.ask(
        "declare",
        APP,
        "ensemble.serve_app:app",
        str(port),
        json.dumps({"config": str(config)}, separators=(",", ":")),
    )
    assert APP in apps  # type: ignore[operator]
    reply = httpx.post(
        f"http://127.0.0.1:{port}/v2/models/digits/infer",
        json={"inputs": [good_input()]},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answered = sorted(reply.json()["parameters"]["members_answered"].split(","))
    assert answered == ["logreg@edge", "mlp_small@cloud"]
    placed = cluster.ask("placement", APP, "mlp_small-cloud-0")
    assert placed == {"mlp_small-cloud-0": ["cloud"]}
    hub = cluster.ask("hub", APP)
    assert isinstance(hub, dict) and hub["replicas"], hub
