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

from ensemble.auth import API_KEYS_ENV, FEEDBACK_TOKEN_ENV
from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.integrity import EXIT_INTEGRITY
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
RESTART_BACKOFF_MIN_S = 1.0
"""Wait before restarting a child that died soon after its last restart; doubles each time."""
RESTART_BACKOFF_MAX_S = 30.0
"""Longest wait between restarts; a child that served this long since its last start is
restarted at once when it dies (the backoff starts over)."""


def restart_delay(streak: int, min_s: float, max_s: float) -> float:
    """Wait before restart number ``streak + 1`` of a run of quick deaths (``streak`` 0: the
    child had served for a while, so at once): ``min_s``, then twice as long each time, at most
    ``max_s``, as the kubelet's CrashLoopBackOff does."""
    if streak <= 0:
        return 0.0
    return min(max_s, min_s * 2.0 ** min(streak - 1, 62))


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
    sha256: str | None = None
    """The digest the gateway verified the model file against; the child refuses to serve a
    file that hashes otherwise (at every start, restarts included)."""
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
        if self.sha256 is not None:
            args += ["--sha256", self.sha256]
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


def child_env() -> dict[str, str]:
    """A child's environment: the gateway's, without its API keys (the gateway calls its
    children on loopback without them, so a child must not ask for one) and without its
    feedback token (a replica serves no ensemble: it has nothing to learn)."""
    env = {k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, FEEDBACK_TOKEN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcessReplica(HttpReplica):
    """A replica the gateway runs as an `ensemble replica` child on loopback.

    ``start()`` spawns the child in a session of its own (a terminal's Ctrl-C reaches the
    gateway, which then stops its children in order), waits for its ready line (at most
    ``startup_timeout_s``; a child that exits or stays silent is killed and the error ends with
    its stderr), then calls it as any OIP REST server: binary tensors, pooled connections,
    health checks, call timeouts. ``close()`` sends SIGTERM (the child finishes its calls in
    flight), waits ``stop_timeout_s``, kills the process group if it is still there, and reaps
    it.

    A child that dies on its own (a crash, SIGKILL, the OOM killer) is reaped, the replica turns
    unready at once and a warning gives the exit code and stderr tail; then a fresh child is
    started in its place (a new port), with a backoff between quick deaths (``restart_delay``).
    The restart lives here, in the replica, rather than in the member or the control loop: the
    replica alone owns the child and sees its exit code the moment it dies (the loop samples
    once per interval, and only runs a policy with `autoscaling:`), and a replica that stays the
    same object keeps its name, its place in routing and in the member's and the loop's replica
    counts, so the placement never shrinks and nothing else needs to know; this is the kubelet's
    restart of a container in place, in its pod.
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
        restart: bool = True,
        restart_backoff_min_s: float = RESTART_BACKOFF_MIN_S,
        restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S,
    ) -> None:
        super().__init__(name, tier, "", command.name, outputs, timeout_s=timeout_s, health=health)
        self.command = command
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart = restart
        """Replace a child that dies on its own (False: the replica stays unready)."""
        self.restart_backoff_min_s = restart_backoff_min_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.restarts = 0
        """Children started in place of one that died (what a restart counter exports)."""
        self._streak = 0
        """Restarts in a row since a child last served for ``restart_backoff_max_s``."""
        self._serving_since = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        """The current child's: its stdout drain and exit watch."""
        self._stopping: asyncio.Task[None] | None = None
        """``close()``'s stop of the child (None before close)."""
        self._restarting: asyncio.Task[None] | None = None

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
        await self._spawn()
        if self._proc is not None and not self._closed:
            await super().start()  # connection pool and first health check

    async def close(self) -> None:
        self._closed = True  # no restart from now on
        restarting, self._restarting = self._restarting, None
        if restarting is not None:  # a child it started is killed, or becomes ``_proc``
            restarting.cancel()
            await asyncio.wait([restarting])
        await super().close()  # no more calls or health checks; connections closed
        if self._proc is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop_child(self._proc, graceful=True))
        # Shielded: a caller cancelled mid-drain (the control loop stopping) must not leave the
        # child running; the stop carries on and kills it if it is itself cancelled.
        await asyncio.shield(self._stopping)

    # -- the child -------------------------------------------------------------------------

    async def _spawn(self) -> None:
        """Start a child and wait for its ready line; it becomes ``_proc``, listening at
        ``endpoint``. A child that exits or stays silent is killed and reaped, and the error
        (with its stderr tail) raised; one started while the replica closes is stopped."""
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
                env=child_env(),
            )
        except OSError as exc:
            raise EnsembleError(f"{self}: cannot start {argv[0]}: {exc}") from exc
        self.endpoint = ""  # not the dead child's any more (its clients keep their own)
        log.info("%s: starting `ensemble replica %s`", self, self.command.model)
        assert proc.stdout is not None and proc.stderr is not None
        self._stderr.clear()  # the tail is this child's
        self._stderr_reader = asyncio.create_task(self._keep_tail(proc.stderr))
        try:
            ready = await self._ready_line(proc, proc.stdout)
        except BaseException as exc:
            stop = self._stopping  # close() stops this child already
            if stop is None:
                stop = asyncio.create_task(self._stop_child(proc, graceful=False))
            await asyncio.shield(stop)  # killed and reaped even if start is cancelled
            if self._closed and isinstance(exc, EnsembleError):
                return  # closed while it started (it was stopped): nothing to report
            raise
        self.endpoint = f"http://{ready.host}:{ready.http_port}"
        self._serving_since = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._discard(proc.stdout)),
            asyncio.create_task(self._watch_exit(proc)),
        ]
        log.info("%s is listening after %.1f s", self, time.monotonic() - began)

    async def _restart(self) -> None:
        """Start children until one is ready, waiting ``restart_delay`` before each, then call
        it: new connections to its port, readiness from a first health check."""
        while not self._closed:
            delay = restart_delay(
                self._streak, self.restart_backoff_min_s, self.restart_backoff_max_s
            )
            self._streak += 1
            if delay > 0:
                log.info("%s: restarting its child in %g s", self, delay)
                await asyncio.sleep(delay)
            try:
                await self._spawn()
            except EnsembleError as exc:
                log.warning("%s: restart failed: %s", self, exc)
                continue
            if self._closed:  # close() waits for this task, then stops the child
                return
            self.restarts += 1
            # New clients for the new port first, then the old ones go: a call never finds
            # a closed client (those on the old port failed when the child died).
            client, checker = self._client, self._checker
            self._connect()
            await client.aclose()
            await checker.aclose()
            await self._probe()
            log.info("%s restarted (restart %d of this replica)", self, self.restarts)
            return

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
        if code == EXIT_INTEGRITY:
            raise ModelIntegrityError(
                [f"{self} refused its model file before it was ready{self._tail()}"],
                [self.command.name],
            )
        raise EnsembleError(f"{self} exited with code {code} before it was ready{self._tail()}")

    async def _stop_child(self, proc: asyncio.subprocess.Process, *, graceful: bool) -> None:
        """SIGTERM and a wait (when ``graceful``), then SIGKILL to the child's process group;
        always reaped. Cancelled, it kills at once."""
        try:
            if graceful and proc.returncode is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
                except TimeoutError:
                    log.warning(
                        "%s did not exit within %g s of SIGTERM (process.stop_timeout_s); "
                        "killing it",
                        self,
                        self.stop_timeout_s,
                    )
            self._signal(proc, signal.SIGKILL)
            code = await proc.wait()
        except asyncio.CancelledError:
            self._signal(proc, signal.SIGKILL)
            raise
        finally:
            await self._stderr_read()
            if proc is self._proc:
                for task in self._tasks:
                    task.cancel()
        if graceful:
            log.info("%s stopped (exit code %d)", self, code)

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        """Signal a child's process group (it leads one: anything it started goes too); only
        while it is unreaped, so its id cannot belong to another process yet."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping is not None or self._closed or proc is not self._proc:
            return
        # Unready at once, whatever the health checks' threshold: nothing listens any more.
        self._healthy = False
        self.last_check_error = f"its process exited with code {code}"
        await self._stderr_read()
        if self._closed:
            return
        served = time.monotonic() - self._serving_since
        if served >= self.restart_backoff_max_s:
            self._streak = 0  # it had served a while: this is no crash loop
        log.warning(
            "%s exited on its own with code %d after %.1f s%s%s",
            self,
            code,
            served,
            "; starting a new child" if self.restart else "; not restarted",
            self._tail(),
        )
        if self.restart and self._restarting is None:
            self._restarting = asyncio.create_task(self._restart_then_clear())

    async def _restart_then_clear(self) -> None:
        try:
            await self._restart()
        finally:
            if self._restarting is asyncio.current_task():
                self._restarting = None

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
