"""A real Triton Inference Server (from the `nvidia-pytriton` wheel, in its own environment
`.venv-triton`) serves one zoo member; the gateway uses it as that member's cloud replica over
gRPC (`backend: triton`) beside in-process edge members, and as another member's over HTTP
(`backend: oip-http`).

Triton's environment needs the package registry the first time. When it cannot be made the
test fails under CI (`CI` set), and is skipped, saying why, only outside CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.helpers import metric
from tests.integration.conftest import array_input
from tests.integration.process import ROOT, ZOO, GatewayProcess, start_from_config, zoo_member
from tests.triton import venv

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MEMBER = "mlp_large"
TRITON_MODEL = "digits_mlp"  # a name of its own on Triton, so `remote_model` is exercised
SERVE = ROOT / "tests" / "triton" / "serve_member.py"
CHECK = {"health_check_interval_s": 0.2, "health_check_timeout_s": 1.0}


@dataclass
class Triton:
    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def triton_python() -> Path:
    try:
        return venv.ensure()
    except RuntimeError as exc:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"the Triton environment is required in CI: {exc}", pytrace=False)
        pytest.skip(f"no Triton environment (outside CI only): {str(exc)[:500]}")


def start_triton(python: Path, log_path: Path, timeout_s: float = 120.0) -> Triton:
    http_port, grpc_port = free_ports(2)
    cmd = [str(python), str(SERVE), str(ZOO / f"{MEMBER}.onnx"), "--name", TRITON_MODEL]
    cmd += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    # The Python-backend stub must load this interpreter's libpython; serve_member.py puts
    # its directory on LD_LIBRARY_PATH itself, so the environment is passed through unchanged.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Triton logs to stdout as well: everything goes to the log file (no pipe to fill), where
    # the ready line is looked for.
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        lines = log_path.read_text(errors="replace").splitlines()
        if any(line.startswith("triton ready:") for line in lines):
            return Triton(proc, http_port, grpc_port, log_path)
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"Triton did not become ready:\n{log_path.read_text()[-6000:]}")


def stop_triton(triton: Triton) -> int:
    triton.proc.send_signal(signal.SIGTERM)
    try:
        return triton.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        triton.proc.kill()
        triton.proc.wait()
        raise AssertionError(f"Triton did not exit after SIGTERM\n{triton.log()}") from None


@pytest.fixture(scope="module")
def triton(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    python = triton_python()
    server = start_triton(python, tmp_path_factory.mktemp("triton") / "triton.log")
    try:
        yield server
    finally:
        code = stop_triton(server)
    assert code == 0, server.log()


@pytest.fixture(scope="module")
def gateway(triton: Triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    remote = {"remote_model": TRITON_MODEL, **CHECK}
    config = {
        "ensembles": [
            {
                "name": "mixed",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("forest"),
                    zoo_member(
                        MEMBER,
                        {"tier": "cloud", "backend": "triton", "endpoints": [triton.grpc_target]}
                        | remote,
                    ),
                ],
            },
            {
                # The same Triton model over HTTP.
                "name": "over_http",
                "members": [
                    {
                        **zoo_member(
                            MEMBER,
                            {
                                "tier": "cloud",
                                "backend": "oip-http",
                                "endpoints": [f"http://{triton.http_target}"],
                            }
                            | remote,
                        ),
                        "name": f"{MEMBER}_http",
                    }
                ],
            },
            {
                # The same models, all in the gateway's process: the expected answers.
                "name": "local",
                "members": [
                    {**zoo_member(name), "name": f"{name}_local"}
                    for name in ("logreg", "forest", MEMBER)
                ],
            },
        ]
    }
    gw = start_from_config(config, tmp_path_factory.mktemp("triton-gw"))
    yield gw
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def test_triton_serves_the_member_as_onnxruntime_does(
    triton: Triton, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_split[0][:16]
    expected = ort.InferenceSession(str(ZOO / f"{MEMBER}.onnx")).run(None, {"input": x})
    client = grpcclient.InferenceServerClient(triton.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(TRITON_MODEL)
        meta = client.get_model_metadata(TRITON_MODEL, as_json=True)
        assert meta["platform"] == "python"  # Triton's Python backend, not this project's code
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("input", "FP32", ["-1", "64"])
        ]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
            ("label", "INT64"),
            ("probabilities", "FP32"),
        ]
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(TRITON_MODEL, [inp])
        assert result.as_numpy("label").tolist() == expected[0].tolist()
        assert np.allclose(result.as_numpy("probabilities"), expected[1], atol=1e-6)
    finally:
        client.close()
    http = httpclient.InferenceServerClient(triton.http_target)
    try:
        assert http.is_model_ready(TRITON_MODEL)
        inp_http = httpclient.InferInput("input", list(x.shape), "FP32")
        inp_http.set_data_from_numpy(x, binary_data=True)
        labels = http.infer(TRITON_MODEL, [inp_http]).as_numpy("label")
        assert labels.tolist() == expected[0].tolist()
    finally:
        http.close()


def infer(client: httpx.Client, model: str, x: np.ndarray) -> dict[str, Any]:
    body = {"inputs": [array_input(x)]}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_the_gateway_uses_triton_as_a_cloud_replica(
    gateway: GatewayProcess, triton: Triton, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    requests = 0
    with httpx.Client(base_url=gateway.http_url, timeout=30) as client:
        for i in range(0, 80, 20):
            mixed, local = (
                infer(client, "mixed", x[i : i + 20]),
                infer(client, "local", x[i : i + 20]),
            )
            requests += 1
            assert mixed["outputs"][0]["data"] == local["outputs"][0]["data"]
            assert np.allclose(mixed["outputs"][1]["data"], local["outputs"][1]["data"], atol=1e-5)
            params = mixed["parameters"]
            assert params["completeness"] == 1.0, params
            assert f"{MEMBER}@cloud" in params["members_answered"].split(","), params
            assert {"logreg@edge", "forest@edge"} <= set(params["members_answered"].split(","))
        accuracy = np.mean(np.asarray(mixed["outputs"][0]["data"]) == y[60:80])
        assert accuracy > 0.9
        # The member addressed directly answers what Triton's copy of the model answers.
        own = infer(client, f"{MEMBER}_local", x[:8])
        direct = infer(client, MEMBER, x[:8])  # over gRPC (backend triton)
        requests += 1
        over_http = infer(client, f"{MEMBER}_http", x[:8])  # over HTTP (backend oip-http)
        for answer in (direct, over_http):
            assert answer["outputs"][0]["data"] == own["outputs"][0]["data"]
            assert np.allclose(answer["outputs"][1]["data"], own["outputs"][1]["data"], atol=1e-6)
        metrics = client.get("/metrics").text
    # Both members' only replica is Triton: every one of their answers came from it.
    for member, answered in ((MEMBER, requests), (f"{MEMBER}_http", 1)):
        calls = f'ensemble_member_calls_total{{member="{member}",outcome="success",tier="cloud"}}'
        assert metric(metrics, calls) >= answered
        ready = f'ensemble_replica_ready{{member="{member}",replica="cloud/0",tier="cloud"}}'
        assert metric(metrics, ready) == 1.0

    grpc = grpcclient.InferenceServerClient(gateway.grpc_target)
    try:
        inp = grpcclient.InferInput("input", [5, 64], "FP32")
        inp.set_data_from_numpy(x[:5])
        labels = grpc.infer("mixed", [inp]).as_numpy("label")
        assert labels.tolist() == infer_local_labels(gateway, x[:5])
        assert grpc.is_model_ready(MEMBER)
    finally:
        grpc.close()


def infer_local_labels(gateway: GatewayProcess, x: np.ndarray) -> list[int]:
    with httpx.Client(base_url=gateway.http_url, timeout=30) as client:
        labels: list[int] = infer(client, "local", x)["outputs"][0]["data"]
    return labels


def test_without_its_environment_the_test_fails_in_ci_and_skips_only_outside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network() -> Path:
        raise RuntimeError("pip: no network")

    monkeypatch.setattr(venv, "ensure", no_network)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required in CI: pip: no network"):
        triton_python()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"outside CI only\): pip: no network"):
        triton_python()
