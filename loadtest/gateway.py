"""Gateway and replica processes the harness starts: on free ports, ready when they say so."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

READY = re.compile(r"ensemble (?:gateway|replica) ready: http=(\S+):(\d+) grpc=(\S+):(\d+)")


@dataclass
class Gateway:
    """A gateway (or replica) process the harness started, and the addresses it announced."""

    proc: subprocess.Popen[str]
    url: str
    grpc: str


def start_gateway(
    config: Path, log_path: Path, timeout_s: float, env: dict[str, str] | None = None
) -> Gateway:
    """`ensemble serve CONFIG` on free ports; returns once its ready line is printed."""
    args = ["serve", str(config), "--http-port", "0", "--grpc-port", "0"]
    return start_server(args, log_path, timeout_s, env)


def start_server(
    args: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None
) -> Gateway:
    """`ensemble ARGS...` (`serve` or `replica`) with the running interpreter, ``env`` added
    to this process's environment; returns once its ready line is printed."""
    from loadtest.fleet import TargetError

    cmd = [sys.executable, "-m", "ensemble.cli", *args]
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C is for the harness; it stops the gateway itself
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and sel.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break
            match = READY.search(line)
            if match:
                host, http_port, ghost, grpc_port = match.groups()
                # Keep reading stdout so the gateway never blocks on a full pipe.
                threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                return Gateway(proc, f"http://{host}:{http_port}", f"{ghost}:{grpc_port}")
    proc.kill()
    proc.wait()
    proc.stdout.close()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    raise TargetError(f"`ensemble {args[0]}` did not become ready within {timeout_s:g} s:\n{tail}")


def _drain(stream: IO[str]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for _ in stream:
            pass


def stop_gateway(gw: Gateway, timeout_s: float) -> int:
    """SIGCONT (a pause fault may have left it stopped), SIGTERM, wait; kill if it hangs.
    Returns the exit code."""
    if gw.proc.poll() is None:
        gw.proc.send_signal(signal.SIGCONT)
        gw.proc.send_signal(signal.SIGTERM)
    try:
        code = gw.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(
            f"loadtest: process {gw.proc.pid} did not exit {timeout_s:g} s after SIGTERM; "
            "killing it",
            file=sys.stderr,
            flush=True,
        )
        gw.proc.kill()
        code = gw.proc.wait()
    close_stdout(gw)
    return code


def close_stdout(gw: Gateway) -> None:
    """Close the pipe of a process that exited (its reader thread has seen the end)."""
    if gw.proc.stdout is not None:
        with contextlib.suppress(OSError):
            gw.proc.stdout.close()
