"""The systems a benchmark compares, as subprocesses: spawn, wait until ready, account CPU, stop."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"ready: http=(\S+?):(\d+)(?: grpc=(\S+?):(\d+))?")
"""Every peer prints one such line on stdout once it serves (the gateway's own format)."""

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class PeerError(RuntimeError):
    """A peer did not start, or misbehaved; the message carries the tail of its log."""


@dataclass
class Peer:
    """A running peer process, its addresses and its log file."""

    name: str
    proc: subprocess.Popen[str]
    http: tuple[str, int]
    grpc: tuple[str, int] | None
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """CPU used so far by the peer and every process under it (Ray's raylet, workers...)."""
        return tree_cpu_seconds(self.proc.pid)

    def main_thread_cpu_seconds(self) -> float:
        """CPU used so far by the peer's main thread: its event loop, for the gateway and the
        no-op server (the rest of :meth:`cpu_seconds` is other threads and processes); for a
        gateway of several workers, every worker's main thread and the supervisor's."""
        pid = self.proc.pid
        workers = [c for c in _children_map().get(pid, ()) if _is_spawned(c)]
        return sum(thread_cpu_seconds(p, p) for p in (pid, *workers))

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for a clean exit; past the timeout, kill the peer's process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # The peer runs in its own session (start_new_session), so its group id is its pid.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return -signal.SIGKILL


@dataclass
class PendingPeer:
    """A spawned peer whose ready line has not been read yet."""

    name: str
    proc: subprocess.Popen[str]
    log_path: Path

    def wait_ready(self, timeout_s: float) -> Peer:
        """Read stdout until the ready line; afterwards a thread keeps draining it into the log."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = stdout.readline()
                if not line:
                    break
                match = READY.search(line)
                if match is None:
                    continue
                host, port, ghost, gport = match.groups()
                threading.Thread(
                    target=_drain, args=(stdout, self.log_path), daemon=True, name=self.name
                ).start()
                grpc = (ghost, int(gport)) if ghost else None
                return Peer(self.name, self.proc, (host, int(port)), grpc, self.log_path)
        self.proc.kill()
        self.proc.wait()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        raise PeerError(f"{self.name} did not become ready within {timeout_s:.0f} s:\n{tail}")


def spawn(
    name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> PendingPeer:
    """Start ``python ARGS`` from the repository root; stderr goes to ``LOG_DIR/NAME.log``."""
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            # Own process group: a terminal's Ctrl-C reaches only the bench, which then stops
            # every peer cleanly; a hung peer can be killed with everything it started.
            start_new_session=True,
        )
    return PendingPeer(name, proc, log_path)


def _drain(stream: IO[str], log_path: Path) -> None:
    # A peer printing to a pipe nobody reads would block once the pipe buffer fills; the pipe is
    # closed once the peer has exited.
    with stream, log_path.open("a") as log_file:
        for line in stream:
            log_file.write(line)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for servers that cannot be told to bind port 0 (Ray Serve)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _is_spawned(pid: int) -> bool:
    """A process multiprocessing's spawn started (a gateway worker, not its resource tracker)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants still alive (Linux /proc)."""
    children = _children_map()
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        fields = _stat_fields(current)
        if fields is not None:
            # utime, stime (fields 14, 15) and cutime, cstime of reaped children (16, 17).
            total += sum(int(v) for v in fields[11:15])
        stack.extend(children.get(current, ()))
    return total / _TICKS_PER_S


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU of one thread ``tid`` of process ``pid`` (0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this machine wanted them (steal,
    /proc/stat): on a shared VM the part of a slowdown that no process here caused."""
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(values[7]) / _TICKS_PER_S if len(values) > 7 else 0.0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _TICKS_PER_S
