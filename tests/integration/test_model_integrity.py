"""Model integrity through real gateways: a member's ONNX file swapped for another model with the
same inputs and outputs is refused on reload (admin API and SIGHUP; the old config keeps
answering, the metric counts it), on restart (`ensemble serve` exits with the digests), by a
process replica's child and by `ensemble replica`; an unpinned foreign model is refused with the
digest to pin. Models are copied into tmp dirs: the shared zoo is never changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from ensemble.replicas.process import cli_command
from tests.helpers import wait_for
from tests.integration.conftest import array_input
from tests.integration.process import ROOT, ZOO, GatewayProcess, start_gateway

pytestmark = pytest.mark.integration
TOKEN = "integrity-admin-token"
X = np.random.default_rng(5).uniform(0, 16, (3, 64)).astype(np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def zoo_copy(tmp: Path, *names: str) -> None:
    for name in names:
        for suffix in (".onnx", ".card.json"):
            shutil.copy(ZOO / f"{name}{suffix}", tmp / f"{name}{suffix}")


def swap(tmp: Path, member: str, other: str = "mlp_small") -> None:
    """``member``'s file replaced, in place, by another zoo model of the same signature."""
    shutil.copy(ZOO / f"{other}.onnx", tmp / f"{member}.onnx")


def write_config(tmp: Path, members: list[dict[str, Any]]) -> Path:
    path = tmp / "gateway.yaml"
    doc = {"model_zoo": {"dir": str(ZOO)}, "ensembles": [{"name": "e", "members": members}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def member(name: str, **place: Any) -> dict[str, Any]:
    return {"name": name, "model": f"{name}.onnx", "placement": [{"tier": "edge", **place}]}


def serve_and_fail(config: Path) -> subprocess.CompletedProcess[str]:
    args = ["serve", str(config), "--http-port", "0", "--grpc-port", "0"]
    return subprocess.run(
        cli_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def infer(gw: GatewayProcess) -> httpx.Response:
    body = {"inputs": [array_input(X)]}
    return httpx.post(f"{gw.http_url}/v2/models/e/infer", json=body, timeout=30)


def integrity_failures(gw: GatewayProcess, member: str) -> float:
    prefix = f'ensemble_model_integrity_failures_total{{member="{member}"}}'
    for line in httpx.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_swapped_member_is_refused_on_reload_and_on_restart(
    zoo_dir: Path, tmp_path: Path
) -> None:
    zoo_copy(tmp_path, "logreg", "forest")
    card_digest = sha256(tmp_path / "forest.onnx")
    config = write_config(tmp_path, [member("logreg"), member("forest")])
    gw = start_gateway(config, tmp_path / "gw.log", env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    try:
        before = infer(gw)
        assert before.status_code == 200, before.text
        swap(tmp_path, "forest")
        actual = sha256(tmp_path / "forest.onnx")

        refused = httpx.put(
            f"{gw.http_url}/admin/config",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert refused.status_code == 400, refused.text
        (error,) = refused.json()["errors"]
        assert f"model file {tmp_path / 'forest.onnx'} has SHA-256 {actual}" in error
        assert f"its card {tmp_path / 'forest.card.json'} expects {card_digest}" in error
        assert integrity_failures(gw, "forest") == 1

        # The old config keeps answering, with the model it loaded before the swap.
        after = infer(gw)
        assert after.status_code == 200, after.text
        assert after.json()["outputs"] == before.json()["outputs"]
        assert "forest@edge" in after.json()["parameters"]["members_answered"]

        gw.proc.send_signal(signal.SIGHUP)  # the same file, re-read on SIGHUP: refused again
        wait_for(lambda: integrity_failures(gw, "forest") == 2, "the SIGHUP reload's refusal")
        assert infer(gw).status_code == 200
    finally:
        code = gw.stop()
    assert code == 0, gw.log()
    assert "Traceback" not in gw.log()

    done = serve_and_fail(config)  # a restart on the swapped file
    assert done.returncode == 1, done.stderr
    assert f"cannot serve {config}" in done.stderr
    assert f"has SHA-256 {actual}" in done.stderr and f"expects {card_digest}" in done.stderr
    assert "ready:" not in done.stdout


@pytest.mark.slow
def test_a_process_replica_child_refuses_a_file_swapped_while_it_served(
    zoo_dir: Path, tmp_path: Path
) -> None:
    zoo_copy(tmp_path, "logreg")
    config = write_config(tmp_path, [member("logreg", backend="process")])
    gw = start_gateway(config, tmp_path / "gw.log")
    try:
        assert infer(gw).status_code == 200
        swap(tmp_path, "logreg")
        (child,) = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and _serves(pid, tmp_path / "logreg.onnx")
        ]
        os.kill(child, signal.SIGKILL)  # its replacement reads the swapped file
        wait_for(lambda: "refused its model file" in gw.log(), "the restarted child to refuse")
        log = gw.log()
        assert f"has SHA-256 {sha256(tmp_path / 'logreg.onnx')}" in log
    finally:
        code = gw.stop()
    assert code == 0, gw.log()


def _serves(pid: str, model: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"replica" in argv and str(model).encode() in argv and b"--sha256" in argv


def test_a_gateway_refuses_a_swapped_file_for_every_local_backend(
    zoo_dir: Path, tmp_path: Path
) -> None:
    """Checked before anything starts: no child process, no Ray."""
    zoo_copy(tmp_path, "logreg", "forest", "svm")
    for name in ("logreg", "forest", "svm"):
        swap(tmp_path, name)
    done = serve_and_fail(
        write_config(tmp_path, [member("logreg"), member("forest", backend="process")])
    )
    assert done.returncode == 1, done.stderr
    for name in ("logreg", "forest"):  # every refused file in one message
        assert f"member {name!r}: model file {tmp_path / f'{name}.onnx'}" in done.stderr
    ray = {**member("svm"), "placement": [{"tier": "cloud", "backend": "ray"}]}
    done = serve_and_fail(write_config(tmp_path, [ray]))
    assert done.returncode == 1, done.stderr
    assert f"member 'svm': model file {tmp_path / 'svm.onnx'}" in done.stderr
    assert "starting Ray" not in done.stderr


def test_ensemble_replica_checks_sha256_and_the_card(zoo_dir: Path, tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    swap(tmp_path, "logreg")
    model = tmp_path / "logreg.onnx"
    for extra in ([], ["--sha256", sha256(model)]):  # the card beside it still disagrees
        args = ["replica", str(model), "--http-port", "0", "--grpc-port", "0", *extra]
        done = subprocess.run(
            cli_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 3, done.stderr
        assert "logreg.card.json expects" in done.stderr


def test_an_unpinned_foreign_model_is_refused_with_the_digest_to_pin(
    zoo_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(ZOO / "logreg.onnx", tmp_path / "foreign.onnx")  # no card beside it
    digest = sha256(tmp_path / "foreign.onnx")
    config = write_config(tmp_path, [member("foreign")])
    done = serve_and_fail(config)
    assert done.returncode == 1, done.stderr
    assert f"pin it with `sha256: {digest}` in the member's config" in done.stderr

    pinned = write_config(tmp_path, [{**member("foreign"), "sha256": digest}])
    gw = start_gateway(pinned, tmp_path / "gw.log")
    try:
        assert infer(gw).status_code == 200
    finally:
        assert gw.stop() == 0, gw.log()
