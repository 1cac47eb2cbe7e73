"""The hub as a Ray actor, for gateway replicas on many machines (``serve --ray-address``).

The same ``Hub`` as the supervisor's, reached through actor calls instead of a Unix socket: a
replica says hello and gets its index, sends its messages with ``deliver``, and long-polls
``receive`` for the hub's (each poll also says it is alive). A replica that has not polled for
``LEASE_S`` is taken as gone: its index is free again and, if it led, the next live replica
leads. The messages are the wire's frames, so both links share one dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ensemble.cluster.hub import Hub, Worker
from ensemble.cluster.link import HubLink
from ensemble.cluster.wire import unframe

log = logging.getLogger("ensemble.hub")

LEASE_S = 6.0
"""A replica silent for this long is gone (it polls at least every ``POLL_S``)."""
POLL_S = 1.0


class Mailbox:
    """Frames for one replica until it polls for them."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.arrived = asyncio.Event()
        self.seen_s = time.monotonic()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.frames.append(data)
        self.arrived.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        self.arrived.set()


class HubActor:
    """Ray actor (async) holding the gateway replicas' hub; ``serve --ray-address`` owns it."""

    def __init__(self, config_text: str, config_source: str) -> None:
        self.hub = Hub(config_text, config_source)
        self.replicas: dict[int, tuple[Worker, Mailbox]] = {}
        self._watch: asyncio.Task[None] | None = None

    async def hello(self, pid: int, generation: int) -> int:
        """A replica joins; its index (its welcome follows in its mailbox)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._expire())
        index = self.hub.free_index()
        box = Mailbox()
        self.replicas[index] = (self.hub.attach(index, pid, generation, box), box)
        return index

    async def deliver(self, index: int, frames: list[bytes]) -> bool:
        """A replica's messages, in order; False when it is no longer known (it must stop)."""
        found = self.replicas.get(index)
        if found is None:
            return False
        worker, box = found
        box.seen_s = time.monotonic()
        for data in frames:
            self.hub.receive(worker, unframe(data))
        return True

    async def receive(self, index: int, wait_s: float = POLL_S) -> list[bytes] | None:
        """The hub's frames for a replica, waiting up to ``wait_s`` for one; None when the
        replica is no longer known."""
        found = self.replicas.get(index)
        if found is None:
            return None
        _, box = found
        box.seen_s = time.monotonic()
        if not box.frames and not box.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(box.arrived.wait(), wait_s)
        box.arrived.clear()
        frames, box.frames = box.frames, []
        box.seen_s = time.monotonic()
        return None if box.closed and not frames else frames

    async def bye(self, index: int) -> None:
        self._forget(index)

    async def reload(self, text: str, source: str) -> Any:
        """Reload every replica or none (SIGHUP to ``serve --ray-address``, which read the
        file: this actor may run on another machine)."""
        return await self.hub.reload(text, source)

    async def state(self) -> dict[str, Any]:
        """The leader's index and each live replica's process id, by index."""
        pids = {str(i): w.pid for i, (w, _) in self.replicas.items() if i in self.hub.live}
        return {"leader": self.hub.leader, "replicas": pids}

    def _forget(self, index: int) -> None:
        found = self.replicas.pop(index, None)
        if found is not None:
            worker, box = found
            box.close()
            self.hub.detach(worker)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            now = time.monotonic()
            for index, (_, box) in list(self.replicas.items()):
                if now - box.seen_s > LEASE_S:
                    log.warning("gateway replica %d silent for %.0f s: gone", index, LEASE_S)
                    self._forget(index)


class RayHubLink(HubLink):
    """A gateway replica's link to the ``HubActor``."""

    def __init__(self, actor: Any) -> None:
        super().__init__(-1)
        self._actor = actor
        self._outgoing: list[bytes] = []
        self._pending = asyncio.Event()
        self._tasks_running: list[asyncio.Task[None]] = []

    async def join(self, generation: int) -> tuple[Any, int, str, str]:
        """Say hello; (snapshot, generation, config text, source) once the hub welcomes it."""
        import os

        self.index = await self._actor.hello.remote(os.getpid(), generation)
        welcome = self._expect_welcome()
        self._tasks_running = [
            asyncio.create_task(self._poll(), name="hub poll"),
            asyncio.create_task(self._flush(), name="hub send"),
        ]
        return await welcome

    def _write(self, data: bytes) -> None:
        self._outgoing.append(data)
        self._pending.set()

    async def _flush(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            frames, self._outgoing = self._outgoing, []
            try:
                known = await self._actor.deliver.remote(self.index, frames)
            except Exception as exc:  # the actor died (its owner stopped)
                log.error("the hub actor is gone: %s", exc)
                known = False
            if not known:
                self._lost()
                return

    async def _poll(self) -> None:
        while True:
            try:
                frames = await self._actor.receive.remote(self.index)
            except Exception as exc:
                log.error("the hub actor is gone: %s", exc)
                frames = None
            if frames is None:
                self._lost()
                return
            for data in frames:
                self._dispatch(unframe(data))

    async def close(self) -> None:
        for task in self._tasks_running:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._actor.bye.remote(self.index)
