"""Start `ensemble serve` as a real process on free ports and stop it the way operators do."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "digits"
READY = re.compile(r"ensemble gateway ready: http=(\S+):(\d+) grpc=(\S+):(\d+)")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    host: str
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def http_target(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"gateway did not exit after SIGTERM\n{self.log()}") from None


def start_gateway(
    config: Path,
    log_path: Path,
    *extra: str,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """Run `ensemble serve CONFIG --http-port 0 --grpc-port 0` and wait for its ready line."""
    cmd = [
        sys.executable,
        "-m",
        "ensemble.cli",
        "serve",
        str(config),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env
        )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            match = READY.search(line)
            if match:
                host, http_port, _, grpc_port = match.groups()
                return GatewayProcess(proc, host, int(http_port), int(grpc_port), log_path)
    finally:
        sel.close()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"gateway did not become ready:\n{log_path.read_text()}")


def zoo_member(name: str, *placements: dict[str, object]) -> dict[str, object]:
    """A config entry for the zoo model ``name`` (default placement: one edge replica)."""
    return {
        "name": name,
        "model": str(ZOO / f"{name}.onnx"),
        "placement": list(placements) or [{"tier": "edge"}],
    }


def start_from_config(
    doc: dict[str, object], tmp: Path, env: dict[str, str] | None = None
) -> GatewayProcess:
    """Write ``doc`` (zoo directory filled in) as YAML in ``tmp`` and start a gateway on it."""
    import yaml

    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump({"model_zoo": {"dir": str(ZOO)}, **doc}, sort_keys=False))
    return start_gateway(path, tmp / "gw.log", env=env)
