"""`ensemble serve --workers N`: a supervising parent and N worker processes on shared ports.

The parent binds the HTTP port once per worker with SO_REUSEPORT (the kernel spreads new
connections evenly over the sockets; one shared socket would let whichever worker wakes first
accept a whole burst) and hands socket i to worker i, keeping every socket open itself: while a
worker restarts, connections the kernel gives its socket wait in that socket's queue for the
new worker instead of being refused. The gRPC port is checked free, then the workers' gRPC
servers share it with SO_REUSEPORT (gRPC cannot adopt a socket). It runs the hub
(``ensemble.cluster.hub``) the workers share their state through, restarts a worker that dies
(with a growing pause if it keeps dying), reloads the config in every worker or in none on
SIGHUP, and on SIGTERM or SIGINT drains every worker and exits 0. The parent serves no request:
it stays small, so it outlives any worker's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

from ensemble.cluster.hub import Hub
from ensemble.config import GatewayConfig
from ensemble.server import Addresses
from ensemble.worker import WorkerSpec, worker_main

log = logging.getLogger("ensemble.supervisor")

START_TIMEOUT_S = 600.0
"""How long a worker may take to load its models and listen."""
RESTART_PAUSE_S = (1.0, 30.0)
"""Pause before restarting a worker that died: the first, and the most it grows to (doubling
while the worker keeps dying within ``STABLE_S`` of its start)."""
STABLE_S = 30.0
KILL_AFTER_S = 15.0
"""Past the drain timeout, how long a stopping worker has before it is killed."""


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` (the cores this process may use)."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--workers takes a number or `auto`, not {value!r}") from None
    if not 1 <= count <= 64:
        raise ValueError(f"--workers must be between 1 and 64, not {count}")
    return count


def http_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (0: a free one), sharing it with SO_REUSEPORT;
    OSError when the port is busy."""
    held = reserve_port(host, port)
    try:
        port = held.getsockname()[1]
        sockets = [held]
        for _ in range(count - 1):
            sock = socket.socket(held.family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        for sock in sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def reserve_port(host: str, port: int) -> socket.socket:
    """Check ``host:port`` is free (0: pick one) and hold it with SO_REUSEPORT, not listening,
    so the workers' gRPC servers can share it and no other process takes it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEPORT: busy is busy
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        port = probe.getsockname()[1]
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind((host, port))
    except OSError as exc:
        held.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return held


@dataclass
class _Slot:
    """One worker index: its process now and its restart history."""

    index: int
    process: BaseProcess | None = None
    started_s: float = 0.0
    pause_s: float = RESTART_PAUSE_S[0]
    restart_at: float | None = None
    ready: bool = False


class Supervisor:
    """The parent of a gateway's workers (the module's docstring says what it does); ``run`` on
    an event loop until SIGTERM/SIGINT, its result the exit code."""

    def __init__(
        self,
        cfg: GatewayConfig,
        source: Path,
        host: str,
        http_port: int,
        grpc_port: int,
        workers: int,
        announce: Callable[[Addresses], None],
    ) -> None:
        self.cfg, self.source = cfg, source.resolve()
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.slots = [_Slot(i) for i in range(workers)]
        self.announce = announce
        self._context = multiprocessing.get_context("spawn")
        self._cells: SynchronizedArray[Any] = self._context.Array("q", workers)
        self._hub = Hub(source.read_text(encoding="utf-8"), str(self.source), self._ready)
        self._changed = asyncio.Event()
        self._http: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def _ready(self, index: int, addresses: Any) -> None:
        self.slots[index].ready = True
        self._changed.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        folder = tempfile.mkdtemp(prefix="ensemble-hub-")  # mode 0700: this user's only
        held = None
        try:
            self._http = http_sockets(self.host, self.http_port, len(self.slots))
            held = reserve_port(self.host, self.grpc_port)
            self.http_port, self.grpc_port = self._http[0].getsockname()[1], held.getsockname()[1]
            path = os.path.join(folder, "hub.sock")
            await self._hub.start(path)
            for slot in self.slots:
                self._start(slot, path)
            if not await self._all_ready(stop):
                return 1 if not stop.is_set() else 0
            log.info("%d workers serve on %s", len(self.slots), self.host)
            self.announce(Addresses(self.host, self.http_port, self.grpc_port))
            await self._watch(stop, path)
            return 0
        finally:
            await self._stop_all()
            await self._hub.close()
            for sock in (*self._http, held):
                if sock is not None:
                    sock.close()
            shutil.rmtree(folder, ignore_errors=True)

    def _start(self, slot: _Slot, hub_path: str) -> None:
        spec = WorkerSpec(
            slot.index,
            hub_path,
            self._hub.config_text,
            self._hub.config_source,
            self._hub.generation,
            self.host,
            self.http_port,
            self.grpc_port,
            logging.getLogger().level,
        )
        self._cells[slot.index] = 0  # what a dead worker was running is not running any more
        process = self._context.Process(
            target=worker_main,
            args=(spec, self._http[slot.index], self._cells),
            name=f"ensemble-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started_s, slot.ready, slot.restart_at = (
            process,
            time.monotonic(),
            False,
            None,
        )
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    async def _all_ready(self, stop: asyncio.Event) -> bool:
        """Wait until every worker listens; False if one fails to start or a stop comes."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(s.ready for s in self.slots):
            for slot in self.slots:
                process = slot.process
                if process is not None and process.exitcode is not None:
                    log.error(
                        "worker %d exited with code %s while starting; stopping",
                        slot.index,
                        process.exitcode,
                    )
                    return False
            if stop.is_set() or time.monotonic() > deadline:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.2)
        return True

    async def _watch(self, stop: asyncio.Event, hub_path: str) -> None:
        """Restart workers that die, until a stop signal."""
        while not stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                process = slot.process
                if process is not None and process.exitcode is not None:
                    self._cells[slot.index] = 0
                    quick = now - slot.started_s < STABLE_S
                    slot.pause_s = (
                        min(slot.pause_s * 2, RESTART_PAUSE_S[1]) if quick else RESTART_PAUSE_S[0]
                    )
                    slot.restart_at = now + slot.pause_s
                    slot.process = None
                    log.error(
                        "worker %d (pid %s) exited with code %s; restarting it in %.0f s",
                        slot.index,
                        process.pid,
                        process.exitcode,
                        slot.pause_s,
                    )
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot, hub_path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    def _reload(self) -> None:
        """SIGHUP: re-read the config file into every worker, or into none."""

        async def reload() -> None:
            result = await self._hub.reload(None)
            level = logging.INFO if result.ok else logging.WARNING
            log.log(level, "SIGHUP: %s %s", result.message, result.errors or result.workers)

        task = asyncio.create_task(reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_all(self) -> None:
        """SIGTERM every worker (each drains), wait, then kill whatever is left."""
        running = [s.process for s in self.slots if s.process is not None]
        for process in running:
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.drain_timeout_s + KILL_AFTER_S
        await asyncio.to_thread(_join, running, deadline)
        for process in running:
            if process.exitcode is None:
                log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join(5)


def _join(processes: list[BaseProcess], deadline: float) -> None:
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
