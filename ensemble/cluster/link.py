"""A worker's link to the hub (``ensemble.cluster.hub``): publish changes, apply everyone's in
order, ask other workers, answer their questions."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ensemble.cluster.wire import frame, read_frame

log = logging.getLogger("ensemble.worker")

Handler = Callable[[Any], Any]


class RemoteError(Exception):
    """Another worker (or the hub) could not answer."""


class HubLink:
    """One worker's end. Changes (``publish``) come back through ``on_change`` handlers, in the
    hub's order, for this worker's own changes too: a worker never applies a shared change
    before the others can."""

    def __init__(self, index: int) -> None:
        self.index = index
        """This worker's number (a Ray gateway replica gets its from the hub)."""
        self.leader: int | None = None
        self.workers = 1
        """Live workers, as the hub last said."""
        self._changes: dict[str, Handler] = {}
        self._requests: dict[str, Handler] = {}
        self._answers: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._ids = itertools.count(1)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._welcome: asyncio.Future[tuple[Any, int, str, str]] | None = None
        self.closed: asyncio.Event = asyncio.Event()
        """Set when the hub went away (the supervisor died): the worker should stop."""

    @property
    def is_leader(self) -> bool:
        return self.leader == self.index

    def on_change(self, topic: str, handler: Handler) -> None:
        """Apply ``topic``'s changes with ``handler`` (synchronous: runs in the hub's order)."""
        self._changes[topic] = handler

    def on_request(self, method: str, handler: Handler) -> None:
        """Answer other workers' ``method`` questions. A synchronous handler answers in order
        with the changes (a snapshot is exact); an async one runs as its own task."""
        self._requests[method] = handler

    async def connect(self, path: str, generation: int) -> tuple[Any, int, str, str]:
        """Join: the hub answers with (snapshot or None, config generation, config text,
        config source) once this worker may serve."""
        reader, self._writer = await asyncio.open_unix_connection(path)
        welcome = self._expect_welcome()
        self._send(("hello", self.index, os.getpid(), generation))
        self._reader_task = asyncio.create_task(self._read(reader), name="hub link")
        return await welcome

    def _expect_welcome(self) -> asyncio.Future[tuple[Any, int, str, str]]:
        self._welcome = asyncio.get_running_loop().create_future()
        return self._welcome

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    def _send(self, message: tuple[Any, ...]) -> None:
        self._write(frame(message))

    def _write(self, data: bytes) -> None:
        """The transport: the Unix socket (a Ray replica's link sends to the hub actor)."""
        if self._writer is None or self._writer.is_closing():
            raise RemoteError("the link to the supervisor is closed")
        self._writer.write(data)

    def publish(self, topic: str, payload: Any) -> None:
        """Send a change to every worker (this one included) through the hub."""
        self._send(("publish", topic, payload))

    def ready(self, addresses: Any) -> None:
        self._send(("ready", addresses))

    async def ask(self, target: int | None, method: str, payload: Any) -> Any:
        """Another worker's answer (``target``), or every live worker's as {index: (ok,
        value)} (None); RemoteError when it cannot answer."""
        return await self._round_trip(("ask", target, method, payload))

    async def reload(self, text: str | None) -> Any:
        """A config applied in every worker or in none (the hub's ``Reload``)."""
        return await self._round_trip(("reload", text))

    async def _round_trip(self, message: tuple[Any, ...]) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._answers[rid] = future
        try:
            self._send((message[0], rid, *message[1:]))
            ok, value = await future
        finally:
            self._answers.pop(rid, None)
        if not ok:
            raise RemoteError(str(value))
        return value

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_frame(reader)) is not None:
                self._dispatch(message)
        except (ConnectionError, ValueError) as exc:
            log.error("link to the supervisor broken: %s", exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        """The hub is gone: every question fails, and the worker should stop."""
        for future in self._answers.values():
            if not future.done():
                future.set_result((False, "the link to the hub closed"))
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectionError("the hub closed the link first"))
        self.closed.set()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            handler = self._changes.get(message[1])
            if handler is None:
                log.warning("no handler for shared change %r", message[1])
                return
            try:
                handler(message[2])
            except Exception:  # one bad change must not stop the others
                log.exception("applying shared change %r failed", message[1])
        elif kind == "request":
            self._answer(message[1], message[2], message[3])
        elif kind == "answer":
            future = self._answers.get(message[1])
            if future is not None and not future.done():
                future.set_result((message[2], message[3]))
        elif kind == "leader":
            self.leader, self.workers = message[1], message[2]
        elif kind == "welcome" and self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(message[1:])

    def _answer(self, rid: int, method: str, payload: Any) -> None:
        handler = self._requests.get(method)
        if handler is None:
            self._send(("reply", rid, False, f"no handler for {method!r}"))
            return
        try:
            result = handler(payload)
        except Exception as exc:
            log.exception("answering %r failed", method)
            self._send(("reply", rid, False, f"{type(exc).__name__}: {exc}"))
            return
        if inspect.isawaitable(result):
            task = asyncio.create_task(self._answer_later(rid, method, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._send(("reply", rid, True, result))

    async def _answer_later(self, rid: int, method: str, pending: Awaitable[Any]) -> None:
        try:
            value = await pending
        except Exception as exc:
            log.exception("answering %r failed", method)
            self._send(("reply", rid, False, f"{type(exc).__name__}: {exc}"))
            return
        self._send(("reply", rid, True, value))
