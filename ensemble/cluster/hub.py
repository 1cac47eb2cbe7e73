"""The hub: the supervisor's end of its workers' links, and the owner of their shared order.

Every change to state the workers share (a label learned from, a link changed at runtime, a
scaling target) is published through the hub, which sends it to every worker in one order: each
worker applies the same changes in the same order, so their copies agree (a replicated state
machine; a copy is at most one hub round trip behind). A worker that joins late (a restart)
first gets a snapshot from a live worker, then the changes after it. The hub also carries
requests between workers (feedback for an answer another worker gave, a metrics scrape that
needs everyone's counts), runs reloads all-or-nothing (every worker prepares the new config,
then all commit, or all abort), and names the leader: the live worker with the lowest index,
the one that runs the control loop.

Messages are tuples (see ``ensemble.cluster.wire``); the first element names the kind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ensemble.cluster.wire import frame, read_frame

log = logging.getLogger("ensemble.hub")

PREPARE_TIMEOUT_S = 600.0
"""How long the workers may take to build a new config's models."""
ASK_TIMEOUT_S = 30.0


class WorkerGone(Exception):
    """The worker asked went away before it answered."""


class Outbox(Protocol):
    """Where the hub's frames to one worker go: its Unix socket, or a mailbox it polls."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Worker:
    """A worker as the hub knows it."""

    index: int
    pid: int
    outbox: Outbox
    generation: int
    buffered: list[bytes] | None = field(default_factory=list)
    """Changes published while it joins (None once it is live)."""
    gone: bool = False
    """Its link closed: it never becomes live again."""

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_frame(frame(message))

    def send_frame(self, data: bytes) -> None:
        if not self.outbox.is_closing():
            self.outbox.write(data)


@dataclass(frozen=True)
class Reload:
    """A config reload's outcome over all workers."""

    ok: bool
    message: str
    errors: list[str]
    workers: dict[int, str]
    """Per worker: `applied`, `rolled back`, or why it refused."""


class Hub:
    """Serves the workers' links on a Unix socket; see the module's docstring."""

    def __init__(
        self,
        config_text: str,
        config_source: str,
        on_ready: Callable[[int, Any], None] = lambda index, addresses: None,
    ) -> None:
        self.config_text = config_text
        """The config every worker serves now: what a restarted worker starts from."""
        self.config_source = config_source
        self.generation = 0
        """Counts committed reloads; a worker started on an older config catches up."""
        self._on_ready = on_ready
        self._workers: dict[int, Worker] = {}
        """Live workers by index."""
        self._joining: set[Worker] = set()
        self._reserved: set[int] = set()
        """Indexes of workers that said hello and have not left."""
        self._pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        """Held by a reload and by a worker joining: each sees a settled config."""
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.leader: int | None = None

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for worker in list(self._workers.values()) + list(self._joining):
            worker.outbox.close()
        for task in list(self._tasks):
            task.cancel()

    @property
    def live(self) -> list[int]:
        return sorted(self._workers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        if hello is None or hello[0] != "hello":
            writer.close()
            return
        _, index, pid, generation = hello
        worker = self.attach(index, pid, generation, writer)
        try:
            while (message := await read_frame(reader)) is not None:
                self.receive(worker, message)
        except (ConnectionError, ValueError) as exc:
            log.warning("worker %d: link broken: %s", index, exc)
        finally:
            self.detach(worker)
            writer.close()

    def attach(self, index: int, pid: int, generation: int, outbox: Outbox) -> Worker:
        """A worker says hello: it joins (snapshot, then welcome) as soon as it may."""
        worker = Worker(index, pid, outbox, generation)
        self._reserved.add(index)
        self._spawn(self._join(worker))
        return worker

    def free_index(self) -> int:
        """The lowest index no live or joining worker has (for workers that get theirs here)."""
        taken = self._reserved | set(self._workers)
        return next(i for i in range(len(taken) + 1) if i not in taken)

    async def _join(self, worker: Worker) -> None:
        async with self._lock:
            if worker.gone:  # it went away while it waited
                return
            self._joining.add(worker)  # from here on, changes are buffered for it
            snapshot = None
            for donor in [w for w in self._workers.values() if w.index != worker.index]:
                try:  # the donor's snapshot holds every change sent before this question
                    snapshot = await self._ask(donor, "snapshot", None, ASK_TIMEOUT_S)
                    break
                except (WorkerGone, TimeoutError, RuntimeError) as exc:
                    log.warning(
                        "worker %d: no snapshot from %d: %s", worker.index, donor.index, exc
                    )
            if worker.gone:
                return
            if snapshot is None and self._workers:
                log.warning("worker %d joins without the shared state", worker.index)
            self._joining.discard(worker)
            worker.send(
                ("welcome", snapshot, self.generation, self.config_text, self.config_source)
            )
            for data in worker.buffered or ():
                worker.send_frame(data)
            worker.buffered = None
            self._workers[worker.index] = worker
            self._elect()

    def detach(self, worker: Worker) -> None:
        """The worker went away (its link closed, or it stopped polling)."""
        worker.gone = True
        self._joining.discard(worker)
        if self._workers.get(worker.index, worker) is worker:
            self._reserved.discard(worker.index)
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
            self._elect()

    def _elect(self) -> None:
        leader = min(self._workers, default=None)
        if leader != self.leader:
            self.leader = leader
            log.info("control-loop leader: worker %s", leader)
        for w in self._workers.values():
            w.send(("leader", leader, len(self._workers)))

    def receive(self, worker: Worker, message: tuple[Any, ...]) -> None:
        """A message from ``worker``."""
        kind = message[0]
        if kind == "publish":
            self.publish(message[1], message[2])
        elif kind == "reply":
            _, rid, ok, value = message
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result((ok, value))
        elif kind == "ask":
            self._spawn(self._relay(worker, *message[1:]))
        elif kind == "reload":
            self._spawn(self._reload_for(worker, message[1], message[2]))
        elif kind == "ready":
            self._on_ready(worker.index, message[1])
        else:
            log.warning("worker %d sent an unknown message %r", worker.index, kind)

    def publish(self, topic: str, payload: Any) -> None:
        """Send a change to every worker, in the one order all of them apply changes in."""
        data = frame(("event", topic, payload))
        for w in self._workers.values():
            w.send_frame(data)
        for w in self._joining:
            if w.buffered is not None:
                w.buffered.append(data)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, worker: Worker, method: str, payload: Any, timeout_s: float) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        worker.send(("request", rid, method, payload))
        try:
            async with asyncio.timeout(timeout_s):
                while not future.done():
                    if worker.outbox.is_closing():
                        raise WorkerGone(f"worker {worker.index} went away")
                    await asyncio.wait({future}, timeout=0.5)
        finally:
            self._pending.pop(rid, None)
        ok, value = future.result()
        if not ok:
            raise RuntimeError(f"worker {worker.index}: {value}")
        return value

    async def ask_all(
        self, method: str, payload: Any, timeout_s: float = ASK_TIMEOUT_S
    ) -> dict[int, tuple[bool, Any]]:
        """Every live worker's answer, by index: (True, value) or (False, why it failed)."""
        workers = list(self._workers.values())

        async def one(w: Worker) -> tuple[bool, Any]:
            try:
                return True, await self._ask(w, method, payload, timeout_s)
            except (WorkerGone, TimeoutError, RuntimeError) as exc:
                return False, str(exc) or type(exc).__name__

        answers = await asyncio.gather(*(one(w) for w in workers))
        return {w.index: a for w, a in zip(workers, answers, strict=True)}

    async def _relay(
        self, asker: Worker, rid: int, target: int | None, method: str, payload: Any
    ) -> None:
        """A worker's question to another worker (``target``) or to all (None)."""
        try:
            if target is None:
                value: Any = await self.ask_all(method, payload)
            else:
                worker = self._workers.get(target)
                if worker is None:
                    raise WorkerGone(f"worker {target} is not running")
                value = await self._ask(worker, method, payload, ASK_TIMEOUT_S)
            asker.send(("answer", rid, True, value))
        except (WorkerGone, TimeoutError, RuntimeError) as exc:
            asker.send(("answer", rid, False, str(exc) or type(exc).__name__))

    async def _reload_for(self, asker: Worker, rid: int, text: str | None) -> None:
        result = await self.reload(text)
        asker.send(("answer", rid, True, result))

    async def reload(self, text: str | None, source: str = "request body") -> Reload:
        """Apply a config in every live worker or in none. ``text`` None re-reads the config
        file (its text, read here, is what every worker and every later restart uses)."""
        async with self._lock:
            if text is None:
                try:
                    text = await asyncio.to_thread(_read, self.config_source)
                except OSError as exc:
                    return Reload(False, f"cannot read {self.config_source}", [str(exc)], {})
                source = self.config_source
            prepared = await self.ask_all("reload_prepare", (text, source), PREPARE_TIMEOUT_S)
            refused = {i: v for i, (ok, v) in prepared.items() if not ok or v}
            if not prepared:
                return Reload(False, "no worker is running", ["no worker is running"], {})
            if refused:
                await self.ask_all("reload_abort", None)
                said = {tuple(_errors(v)) for v in refused.values()}
                if len(said) == 1 and len(refused) == len(prepared):  # all found the same
                    errors = list(said.pop())
                else:
                    errors = [f"worker {i}: {e}" for i, v in refused.items() for e in _errors(v)]
                states = {i: "rolled back" for i in prepared}
                states.update({i: "; ".join(_errors(v)) for i, v in refused.items()})
                return Reload(False, "invalid config: not applied in any worker", errors, states)
            committed = await self.ask_all("reload_commit", None)
            self.config_text, self.generation = text, self.generation + 1
            states = {i: "applied" if ok else f"lost: {v}" for i, (ok, v) in committed.items()}
            message = f"reloaded {source} in {len(committed)} worker(s)"
            lost = [i for i, (ok, _) in committed.items() if not ok]
            if lost:  # it died between prepare and commit: its restart starts on the new config
                message += f"; worker(s) {lost} went away and restart on it"
            return Reload(True, message, [], states)


def _errors(value: Any) -> list[str]:
    return [str(e) for e in value] if isinstance(value, list) else [str(value)]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
