"""Start `ensemble serve` / `ensemble replica` as real processes on free ports; stop them the way
operators do."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from ensemble.replicas.process import cli_command, parse_ready_line

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "digits"


@dataclass
class GatewayProcess:
    """A running `ensemble serve` or `ensemble replica` and where it listens."""

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

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash or a power cut."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

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
    args = ["serve", str(config), "--http-port", "0", "--grpc-port", "0", *extra]
    return _start(args, log_path, timeout_s, env)


def start_replica(
    model: Path,
    log_path: Path,
    *extra: str,
    http_port: int = 0,
    grpc_port: int = 0,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """Run `ensemble replica MODEL` (free ports unless given) and wait for its ready line."""
    args = ["replica", str(model), "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    return _start([*args, *extra], log_path, timeout_s, env)


def _start(
    args: list[str],
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None,
    command: list[str] | None = None,
    cwd: Path = ROOT,
) -> GatewayProcess:
    cmd = [*command, *args] if command is not None else cli_command(*args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env
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
            ready = parse_ready_line(line)
            if ready is not None:
                return GatewayProcess(proc, ready.host, ready.http_port, ready.grpc_port, log_path)
    finally:
        sel.close()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"`ensemble {args[0]}` did not become ready:\n{log_path.read_text()}")


def start_installed(
    ensemble: Path, args: list[str], log_path: Path, timeout_s: float = 120.0
) -> GatewayProcess:
    """Run an installed `ensemble` command (another virtual environment's) in ``log_path``'s
    directory, so it imports that environment's package, not this checkout's."""
    return _start(args, log_path, timeout_s, None, [str(ensemble)], log_path.parent)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that cannot pick its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def inflight(url: str) -> float:
    """Requests the server at ``url`` is processing now (its metrics' gauge)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ensemble_inflight_requests "):
            return float(line.split()[1])
    return 0.0


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


class Traffic:
    """``clients`` closed-loop clients POSTing ``body`` to a model's infer route from threads
    until stopped (also as a context manager); every HTTP status is kept, and a request whose
    connection broke (a killed server's in-flight work) counts as status 0."""

    def __init__(self, url: str, model: str, body: Mapping[str, object], clients: int = 1) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, model, body), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, model: str, body: Mapping[str, object]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not self._stop.is_set():
                try:
                    status = http.post(f"/v2/models/{model}/infer", json=body).status_code
                except httpx.TransportError:
                    status = 0
                self.statuses.append(status)

    def stop(self) -> list[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.statuses

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class RayCluster:
    """tests/integration/ray_cluster.py in its own process, driven over its stdin/stdout."""

    def __init__(self, log: Path) -> None:
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.ray_cluster"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.log = log
        line = self._line()
        assert line.startswith("cluster ready: "), line + log.read_text()
        self.address = line.removeprefix("cluster ready: ").strip()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def ask(self, *words: str) -> object:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        line = self._line()
        assert line, self.log.read_text()
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.log.read_text()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
