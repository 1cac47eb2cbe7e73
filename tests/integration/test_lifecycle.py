"""Process lifecycle: drain on SIGTERM, clear start-up failures, zoo built on first use."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.conftest import DEFAULT_CONFIG
from tests.integration.process import (
    ROOT,
    inflight,
    start_from_config,
    start_gateway,
    zoo_member,
)

pytestmark = pytest.mark.integration


def test_sigterm_drains_inflight_requests(zoo_dir: Path, tmp_path: Path) -> None:
    # Every call answers 1 s late, so all eight requests are surely in flight at the signal.
    late = {"tier": "edge", "straggler": {"probability": 1.0, "delay_ms": 1000}}
    gw = start_from_config(
        {"ensembles": [{"name": "digits", "members": [zoo_member("logreg", late)]}]}, tmp_path
    )
    x = np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [64, 64], "data": x.ravel().tolist()}
        ]
    }

    def call() -> int:
        return httpx.post(
            f"{gw.http_url}/v2/models/digits/infer", json=body, timeout=60
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call) for _ in range(8)]
        deadline = time.monotonic() + 30
        while inflight(gw.http_url) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inflight(gw.http_url) == 8
        gw.proc.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 8
    assert gw.stop() == 0
    assert "Traceback" not in gw.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensemble.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_invalid_config_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ensembles: [{name: x, members: [], colour: red}]\n")
    result = run_cli("serve", str(bad), "--http-port", "0", "--grpc-port", "0")
    assert result.returncode == 2
    assert "ensembles[0].colour: unknown key" in result.stderr
    assert "ensembles[0].members" in result.stderr


def test_missing_model_outside_zoo_is_a_clear_error(tmp_path: Path) -> None:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["ensembles"][0]["members"][0]["model"] = str(tmp_path / "absent.onnx")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli("serve", str(path), "--http-port", "0", "--grpc-port", "0")
    assert result.returncode == 2
    assert "absent.onnx" in result.stderr and "model file not found" in result.stderr


def test_port_in_use_is_a_clear_error(zoo_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(DEFAULT_CONFIG), "--http-port", str(port), "--grpc-port", "0")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.slow
def test_serve_builds_the_zoo_on_first_use(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(DEFAULT_CONFIG, configs / "default.yaml")  # ../models/digits is now in tmp
    gw = start_gateway(configs / "default.yaml", tmp_path / "gw.log", timeout_s=240)
    try:
        assert (tmp_path / "models" / "digits" / "zoo.json").is_file()
        assert "building the model zoo" in gw.log()
        ready = httpx.get(f"{gw.http_url}/v2/health/ready", timeout=10)
        assert ready.status_code == 200
    finally:
        assert gw.stop() == 0
