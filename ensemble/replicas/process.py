"""The process backend: `ensemble replica` children the gateway starts, calls over HTTP, stops."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ensemble.errors import EnsembleError
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.remote import HealthCheck
from ensemble.types import TensorSpec

log = logging.getLogger("ensemble.replicas")

LOOPBACK = "127.0.0.1"
READY_LINE = re.compile(r"ensemble (gateway|replica) ready: http=(\S+):(\d+) grpc=(\S+):(\d+)")
"""The line `ensemble serve` and `ensemble replica` print on stdout once both frontends listen."""
STDERR_TAIL_LINES = 30
"""A child's last stderr lines kept for error messages (why it did not start, why it died)."""
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class ReadyLine:
    """Where a started `ensemble serve` or `ensemble replica` listens, read from its ready line."""

    kind: str
    """``gateway`` or ``replica``."""
    host: str
    http_port: int
    grpc_port: int


def parse_ready_line(line: str) -> ReadyLine | None:
    """The addresses in a ready line; None for any other line."""
    match = READY_LINE.search(line)
    if match is None:
        return None
    kind, host, http_port, _, grpc_port = match.groups()
    return ReadyLine(kind, host, int(http_port), int(grpc_port))


def cli_command(*args: str) -> list[str]:
    """The `ensemble` command run by this same interpreter, so a child runs the gateway's code."""
    return [sys.executable, "-m", "ensemble.cli", *args]


@dataclass(frozen=True, slots=True)
class ReplicaCommand:
    """What a process replica's child serves and its server settings (`ensemble replica` flags)."""

    model: Path
    name: str
    """The model's name on the child (the member's name)."""
    card: Path | None = None
    """The member card the gateway read (None: the child looks beside the model itself)."""
    executor_threads: int = 1
    max_batch_size: int = 1024
    max_request_bytes: int = 64 * 1024 * 1024
    batching: bool = True
    batch_max_rows: int = 256
    drain_timeout_s: float = 10.0

    def argv(self) -> list[str]:
        """The child's command line: loopback only, free ports it reports in its ready line."""
        args = [
            "replica",
            str(self.model),
            "--name",
            self.name,
            "--host",
            LOOPBACK,
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--executor-threads",
            str(self.executor_threads),
            "--max-batch-size",
            str(self.max_batch_size),
            "--max-request-bytes",
            str(self.max_request_bytes),
            "--batch-max-rows",
            str(self.batch_max_rows),
            "--drain-timeout-s",
            f"{self.drain_timeout_s:g}",
        ]
        if self.card is not None:
            args += ["--card", str(self.card)]
        if not self.batching:
            args.append("--no-batching")
        return cli_command(*args)


@cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the gateway (never between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # type: ignore[attr-defined]
    prctl.restype = ctypes.c_int  # type: ignore[attr-defined]
    return prctl


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the gateway dies, however it
    dies (SIGKILL, OOM, a crash): Linux's parent-death signal. None where there is none.

    It is the kernel's promise, not the child's: a wedged or busy child dies all the same, and
    no child code is involved. The signal follows the *thread* that forked the child, so
    children are spawned from the event loop's thread, which lives as long as the gateway."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def arm() -> None:  # runs in the child between fork and exec: nothing that allocates much
        prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the gateway died before the signal was armed
            os._exit(1)

    return arm


class ProcessReplica(HttpReplica):
    """A replica the gateway runs as an `ensemble replica` child on loopback.

    ``start()`` spawns the child in a session of its own (a terminal's Ctrl-C reaches the
    gateway, which then stops its children in order), waits for its ready line (at most
    ``startup_timeout_s``; a child that exits or stays silent is killed and the error ends with
    its stderr), then calls it as any OIP REST server: binary tensors, pooled connections,
    health checks, call timeouts. ``close()`` sends SIGTERM (the child finishes its calls in
    flight), waits ``stop_timeout_s``, kills the process group if it is still there, and reaps
    it. A child that dies on its own is unready at once and its stderr tail is logged.
    """

    backend = "process"

    def __init__(
        self,
        name: str,
        tier: str,
        command: ReplicaCommand,
        outputs: Sequence[TensorSpec],
        *,
        timeout_s: float = 30.0,
        health: HealthCheck | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(name, tier, "", command.name, outputs, timeout_s=timeout_s, health=health)
        self.command = command
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        where = f"pid {self.pid}" if self.pid is not None else "not started"
        at = f" at {self.endpoint}" if self.endpoint else ""
        return f"replica {self.name} (process {where}{at}, model {self.model!r})"

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it is spawned)."""
        return self._proc.pid if self._proc is not None else None

    def ready(self) -> bool:
        proc = self._proc
        return super().ready() and proc is not None and proc.returncode is None

    async def start(self) -> None:
        if self._proc is not None or self._closed:
            return
        began = time.monotonic()
        argv = self.command.argv()
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=die_with_parent(),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            raise EnsembleError(f"{self}: cannot start {argv[0]}: {exc}") from exc
        log.info("%s: starting `ensemble replica %s`", self, self.command.model)
        assert proc.stdout is not None and proc.stderr is not None
        self._stderr_reader = asyncio.create_task(self._keep_tail(proc.stderr))
        try:
            ready = await self._ready_line(proc, proc.stdout)
        except BaseException as exc:
            if self._stopping is None:
                self._stopping = asyncio.create_task(self._stop_child(graceful=False))
            await asyncio.shield(self._stopping)  # killed and reaped even if start is cancelled
            if self._closed and isinstance(exc, EnsembleError):
                return  # closed while it started (it was stopped): nothing to report
            raise
        self.endpoint = f"http://{ready.host}:{ready.http_port}"
        self._tasks += [
            asyncio.create_task(self._discard(proc.stdout)),
            asyncio.create_task(self._watch_exit(proc)),
        ]
        log.info("%s is listening after %.1f s", self, time.monotonic() - began)
        await super().start()  # connection pool and first health check

    async def close(self) -> None:
        await super().close()  # no more calls or health checks; connections closed
        if self._proc is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop_child(graceful=True))
        # Shielded: a caller cancelled mid-drain (the control loop stopping) must not leave the
        # child running; the stop carries on and kills it if it is itself cancelled.
        await asyncio.shield(self._stopping)

    # -- the child -------------------------------------------------------------------------

    async def _ready_line(
        self, proc: asyncio.subprocess.Process, stdout: asyncio.StreamReader
    ) -> ReadyLine:
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                while line := await stdout.readline():
                    ready = parse_ready_line(line.decode(errors="replace"))
                    if ready is not None:
                        return ready
                code = await proc.wait()
        except TimeoutError:
            raise EnsembleError(
                f"{self} printed no ready line within {self.startup_timeout_s:g} s "
                f"(process.startup_timeout_s), so it was killed{self._tail()}"
            ) from None
        await self._stderr_read()
        raise EnsembleError(f"{self} exited with code {code} before it was ready{self._tail()}")

    async def _stop_child(self, *, graceful: bool) -> None:
        """SIGTERM and a wait (when ``graceful``), then SIGKILL to the child's process group;
        always reaped. Cancelled, it kills at once."""
        proc = self._proc
        assert proc is not None
        try:
            if graceful and proc.returncode is None:
                self._signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
                except TimeoutError:
                    log.warning(
                        "%s did not exit within %g s of SIGTERM (process.stop_timeout_s); "
                        "killing it",
                        self,
                        self.stop_timeout_s,
                    )
            self._signal(signal.SIGKILL)
            code = await proc.wait()
        except asyncio.CancelledError:
            self._signal(signal.SIGKILL)
            raise
        finally:
            await self._stderr_read()
            for task in self._tasks:
                task.cancel()
        if graceful:
            log.info("%s stopped (exit code %d)", self, code)

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the child's process group (it leads one: anything it started goes too); only
        while it is unreaped, so its id cannot belong to another process yet."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping is not None or self._closed:
            return
        await self._stderr_read()
        log.warning("%s exited on its own with code %d%s", self, code, self._tail())
        self.record_check(f"its process exited with code {code}")

    async def _keep_tail(self, stderr: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stderr.readline()
            except ValueError:  # a line over the reader's limit: dropped
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            log.debug("%s stderr: %s", self, line)

    async def _discard(self, stdout: asyncio.StreamReader) -> None:
        # The child prints nothing after its ready line; reading keeps a full pipe from ever
        # blocking it all the same.
        while True:
            try:
                if not await stdout.readline():
                    return
            except ValueError:
                continue

    async def _stderr_read(self) -> None:
        """Wait (briefly) for the child's stderr to reach its end: the tail is then complete."""
        reader = self._stderr_reader
        if reader is not None and not reader.done():
            await asyncio.wait([reader], timeout=2.0)
            reader.cancel()

    def _tail(self) -> str:
        if not self._stderr:
            return "; it wrote nothing on stderr"
        lines = "\n".join(f"  | {line}" for line in self._stderr)
        return f"; its stderr ends with:\n{lines}"
