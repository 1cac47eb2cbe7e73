"""The slim install an edge node gets with `pip install ensemble-gateway` (no extras): built in
a fresh virtual environment from this checkout, it has no Ray, no training stack and no
plotting, and still serves a model (`ensemble replica`) and an in-process ensemble (`ensemble
serve`); what needs an extra says which."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import good_input
from tests.integration.process import ROOT, ZOO, start_installed, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with this checkout installed, no extras; its bin/."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return venv / "bin"


def test_the_slim_install_leaves_out_ray_training_and_plots(slim: Path) -> None:
    for module in ("ray", "sklearn", "skl2onnx", "matplotlib"):
        found = subprocess.run(
            [str(slim / "python"), "-c", f"import {module}"], capture_output=True, timeout=60
        )
        assert found.returncode != 0, f"{module} is in the slim install"
    build = subprocess.run(
        [str(slim / "ensemble"), "models", "build", "--out", str(slim.parent / "zoo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode != 0
    assert "pip install 'ensemble-gateway[zoo]'" in build.stderr, build.stderr


def test_the_slim_install_serves_a_replica_and_an_ensemble(zoo_dir: Path, slim: Path) -> None:
    tmp = slim.parent
    replica = start_installed(
        slim / "ensemble",
        ["replica", str(ZOO / "logreg.onnx"), "--http-port", "0", "--grpc-port", "0"],
        tmp / "replica.log",
    )
    try:
        config = tmp / "edge.yaml"
        doc = {
            "model_zoo": {"dir": str(ZOO), "build_if_missing": False},
            "ensembles": [
                {
                    "name": "digits",
                    "members": [
                        zoo_member("logreg"),
                        zoo_member("mlp_small_int8"),
                        {
                            "name": "remote",
                            "model": str(ZOO / "logreg.onnx"),
                            "placement": [
                                {
                                    "tier": "edge",
                                    "backend": "oip-http",
                                    "endpoints": [replica.http_url],
                                    "remote_model": "logreg",
                                }
                            ],
                        },
                    ],
                }
            ],
        }
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        gateway = start_installed(
            slim / "ensemble",
            ["serve", str(config), "--http-port", "0", "--grpc-port", "0"],
            tmp / "gateway.log",
        )
        try:
            reply = httpx.post(
                f"{gateway.http_url}/v2/models/digits/infer",
                json={"inputs": [good_input()]},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            answered = reply.json()["parameters"]["members_answered"].split(",")
            assert sorted(answered) == ["logreg@edge", "mlp_small_int8@edge", "remote@edge"]
        finally:
            assert gateway.stop() == 0, gateway.log()
    finally:
        assert replica.stop() == 0, replica.log()
