"""Cloud members on Ray Serve: a gateway whose config places members on the `ray` backend starts
a private Ray on loopback, deploys them there and calls them by handle; answers equal the
in-process ones, over HTTP and gRPC (tritonclient), and a partitioned link to the Ray tier
degrades the ensemble without losing a request; a model with external data runs there too."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from ensemble.integrity import model_digest
from tests.helpers import save_with_external_data, wait_for
from tests.integration.conftest import array_input
from tests.integration.process import ZOO, GatewayProcess, start_from_config, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "ray-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
RAY = {"tier": "cloud", "backend": "ray", "health_check_interval_s": 0.2}
X = np.random.default_rng(7).uniform(0, 16, (5, 64)).astype(np.float32)


def ray_processes(pid: int) -> list[int]:
    """Ray's processes started by the gateway ``pid`` (its GCS server and raylet, children)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return [p for p in children if "ray" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("ray")
    # Version 2 is mlp_small's model with its weights in an external data file, pinned.
    second = save_with_external_data(ZOO / "mlp_small.onnx", tmp / "second.onnx")
    config = {
        "tiers": {"edge": {}, "cloud": {"link": {"emulate": True, "delay_ms": 1}}},
        "ensembles": [
            {
                "name": "mixed",
                "members": [
                    zoo_member("logreg"),
                    zoo_member(
                        "mlp_large",
                        {**RAY, "replicas": {"min": 2, "max": 2}, "ray": {"num_cpus": 0.25}},
                    ),
                    {
                        **zoo_member("forest", RAY),
                        # A second version, on Ray too: a deployment of its own.
                        "versions": [
                            {"version": "2", "model": str(second), "sha256": model_digest(second)}
                        ],
                        "default_version": "1",
                    },
                ],
            },
            {
                # The same models in the gateway's process: the expected answers.
                "name": "local",
                "members": [
                    {**zoo_member("logreg"), "name": "logreg_local"},
                    {**zoo_member("mlp_large"), "name": "mlp_large_local"},
                    {**zoo_member("forest"), "name": "forest_local"},
                ],
            },
            {"name": "second", "members": [{**zoo_member("mlp_small"), "name": "mlp_small_local"}]},
        ],
        "policies": {"default": {"on_violation": "degrade"}},
    }
    gateway = start_from_config(config, tmp, env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    yield gateway
    ray = ray_processes(gateway.proc.pid)
    assert ray, "the gateway runs Ray's processes as its children"
    assert gateway.stop(timeout_s=60) == 0, gateway.log()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in ray) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in ray if Path(f"/proc/{p}").exists()]
    assert not left, f"Ray processes left behind by the gateway: {left}"
    assert "Traceback" not in gateway.log(), gateway.log()


def infer(gw: GatewayProcess, model: str, x: np.ndarray = X) -> tuple[int, dict[str, Any]]:
    response = httpx.post(
        f"{gw.http_url}/v2/models/{model}/infer", json={"inputs": [array_input(x)]}, timeout=30
    )
    return response.status_code, response.json()


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    out = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_ray_members_answer_as_in_process(gw: GatewayProcess) -> None:
    status, mixed = infer(gw, "mixed")
    assert status == 200, mixed
    answered = mixed["parameters"]["members_answered"].split(",")
    assert answered == ["logreg@edge", "mlp_large@cloud", "forest@cloud"]
    status, local = infer(gw, "local")
    assert status == 200, local
    np.testing.assert_allclose(probabilities(mixed), probabilities(local), atol=1e-6)


def test_tritonclient_reaches_ray_members_over_both_protocols(gw: GatewayProcess) -> None:
    _, expected = infer(gw, "mlp_large_local")
    with httpclient.InferenceServerClient(gw.http_target) as client:
        tensor = httpclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=True)
        result = client.infer("mlp_large", [tensor])
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), probabilities(expected), atol=1e-6
        )
        assert client.is_model_ready("mlp_large")
    with grpcclient.InferenceServerClient(gw.grpc_target) as client:
        tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("forest", [tensor])
        _, forest = infer(gw, "forest_local")
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities(forest))
        assert result.get_response().parameters["members_answered"].string_param == "forest@cloud"


def test_a_further_version_runs_on_ray_as_its_own_deployment(gw: GatewayProcess) -> None:
    status, second = infer(gw, "forest/versions/2")
    assert status == 200, second
    assert second["model_version"] == "2"
    _, expected = infer(gw, "mlp_small_local")  # version 2 is mlp_small's, weights apart
    np.testing.assert_allclose(probabilities(second), probabilities(expected), atol=1e-6)
    _, first = infer(gw, "forest")  # the default, version 1, still forest's
    _, forest = infer(gw, "forest_local")
    np.testing.assert_allclose(probabilities(first), probabilities(forest), atol=1e-6)


def test_bad_input_to_a_ray_member_is_a_400(gw: GatewayProcess) -> None:
    status, answer = infer(gw, "mlp_large", np.zeros((1, 63), np.float32))
    assert status == 400 and "63" in answer["error"]
    body = {"inputs": [{**array_input(X), "datatype": "FP64"}]}
    response = httpx.post(f"{gw.http_url}/v2/models/forest/infer", json=body, timeout=30)
    assert response.status_code == 400 and "FP64" in response.json()["error"]


def test_ray_replicas_are_health_checked_and_reported(gw: GatewayProcess) -> None:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    ready = [line for line in text.splitlines() if line.startswith("ensemble_replica_ready{")]
    ray_lines = [
        line for line in ready if 'member="mlp_large"' in line or 'member="forest"' in line
    ]
    assert len(ray_lines) == 2 and all(line.endswith(" 1.0") for line in ray_lines), ready
    assert httpx.get(f"{gw.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_partitioned_ray_tier_degrades_then_recovers(gw: GatewayProcess) -> None:
    url = f"{gw.http_url}/admin/links/cloud"
    answer = httpx.put(url, json={"partitioned": True}, headers=AUTH, timeout=10)
    assert answer.status_code == 200
    try:
        status, degraded = infer(gw, "mixed")
        assert status == 200, degraded
        params = degraded["parameters"]
        assert params["degraded"] is True
        assert params["members_answered"] == "logreg@edge"
        # Health checks cross the link too: the Ray members turn unready.
        wait_for(
            lambda: httpx.get(f"{gw.http_url}/v2/models/forest/ready").status_code == 503,
            "the partitioned member turns unready",
            10.0,
        )
    finally:
        assert httpx.delete(url, headers=AUTH, timeout=10).status_code == 200

    def whole() -> bool:
        status, answer = infer(gw, "mixed")
        return status == 200 and "degraded" not in answer["parameters"]

    assert wait_for(whole, "answers from every member again", timeout_s=5.0) < 5.0
