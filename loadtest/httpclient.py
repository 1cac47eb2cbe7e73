"""A lean HTTP/1.1 keep-alive client on asyncio Protocols: pre-encoded requests, a connection pool.

httpx spends ~3 ms of CPU per request; a load generator needs ~100 us. So this client does the
minimum: one request in flight per connection, Content-Length bodies only, callbacks instead of
tasks, and one sweeper for all timeouts instead of a timer per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

Done = Callable[[int, int | None, bytes, str | None], None]
"""Called once per request: (status, Inference-Header-Content-Length, body, error kind or None)."""

MAX_HEAD_BYTES = 64 * 1024


def encode_request(
    method: str, host: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The exact bytes of one request, built once and written as they are for every send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _header_int(head: bytes, name: bytes) -> int | None:
    i = head.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = head.find(b"\r\n", start)
    return int(head[start : end if end >= 0 else len(head)])


class _Pending:
    __slots__ = ("conn", "deadline", "done", "finished", "payload", "retried")

    def __init__(self, payload: bytes, done: Done, deadline: float) -> None:
        self.payload = payload
        self.done = done
        self.deadline = deadline
        self.conn: _Connection | None = None
        self.finished = False
        self.retried = False


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current: _Pending | None = None
        self.served = 0
        self._reset()

    def _reset(self) -> None:
        self.body_start = -1
        self.body_len = 0
        self.status = 0
        self.header_length: int | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, pending: _Pending) -> None:
        assert self.transport is not None
        self.current = pending
        pending.conn = self
        self.transport.write(pending.payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.current is None:
            self._abort()  # bytes nobody asked for: the stream is out of step
            return
        if self.body_start < 0 and not self._parse_head():
            return
        end = self.body_start + self.body_len
        if len(buf) < end:
            return
        body = bytes(buf[self.body_start : end])
        del buf[:end]
        pending, status, header_length = self.current, self.status, self.header_length
        self.current = None
        self.served += 1
        close = self.close_after or bool(buf)
        self._reset()
        if close:
            self._abort()
        else:
            self.pool._release(self)
        self.pool._finish(pending, status, header_length, body, None)

    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                self._fail("bad_response")
            return False
        head = bytes(self.buf[:end]).lower()
        try:
            if not head.startswith(b"http/1."):
                raise ValueError(head[:16])
            self.status = int(head[9:12])
            length = _header_int(head, b"\r\ncontent-length:")
            if length is None:
                raise ValueError("no Content-Length (chunked bodies are not supported)")
            self.header_length = _header_int(head, b"\r\ninference-header-content-length:")
        except ValueError:
            self._fail("bad_response")
            return False
        self.body_start = end + 4
        self.body_len = length
        self.close_after = b"\r\nconnection: close" in head
        return True

    def _fail(self, kind: str) -> None:
        pending = self.current
        self.current = None
        self._abort()
        if pending is not None:
            self.pool._finish(pending, 0, None, b"", kind)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        pending = self.current
        self.current = None
        self.pool._lost(self)
        if pending is None or pending.finished:
            return
        # A keep-alive connection the server closed while idle fails the next write; that is the
        # client's race, not the server's error, so the request goes again once on a fresh one.
        if self.served > 0 and not self.buf and not pending.retried:
            pending.retried = True
            pending.conn = None
            self.pool._dispatch(pending)
        else:
            self.pool._finish(pending, 0, None, b"", "connection")


class HttpPool:
    """Up to ``size`` keep-alive connections to one server; requests queue for a free one."""

    def __init__(self, host: str, port: int, size: int, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.size = size
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiting: deque[_Pending] = deque()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadlines: deque[_Pending] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        # Timeouts fire up to this late; a timer per request would cost more than the request.
        self._sweep_s = min(0.02, timeout_s / 10)
        self.queued = 0
        """Requests that found every connection busy and waited for one."""
        self.opened = 0
        """Connections opened so far."""

    async def connect(self, count: int) -> None:
        """Open ``count`` connections up front so the first requests do not pay for them."""
        await asyncio.gather(*(self._open_one() for _ in range(min(count, self.size))))

    def send(self, payload: bytes, done: Done) -> None:
        """Send pre-encoded request bytes; ``done`` is called later, never from inside send."""
        pending = _Pending(payload, done, self.loop.time() + self.timeout_s)
        # Every request has the same timeout, so sending order is deadline order.
        self._deadlines.append(pending)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_s, self._sweep)
        self._dispatch(pending)

    def _sweep(self) -> None:
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0].finished or deadlines[0].deadline <= now):
            pending = deadlines.popleft()
            if not pending.finished:
                self._expire(pending)
        self._sweeper = self.loop.call_later(self._sweep_s, self._sweep) if deadlines else None

    def _dispatch(self, pending: _Pending) -> None:
        if self._closed:
            self.loop.call_soon(self._finish, pending, 0, None, b"", "connection")
        elif self._idle:
            self._idle.pop().start(pending)
        else:
            self.queued += 1
            self._waiting.append(pending)
            if len(self._open) + self._connecting < self.size:
                self._spawn_open()

    def _spawn_open(self) -> None:
        task = self.loop.create_task(self._open_one())
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _open_one(self) -> None:
        self._connecting += 1
        try:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError:
            self._connecting -= 1
            if not self._open and not self._connecting:
                # Nothing will ever serve the queue: fail it now rather than at each timeout.
                while self._waiting:
                    self._finish(self._waiting.popleft(), 0, None, b"", "connection")
            return
        self._connecting -= 1
        if self._closed:
            conn._abort()
            return
        self._open.add(conn)
        self.opened += 1
        self._release(conn)

    def _release(self, conn: _Connection) -> None:
        while self._waiting:
            pending = self._waiting.popleft()
            if not pending.finished:
                conn.start(pending)
                return
        self._idle.append(conn)

    def _lost(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        busy = len(self._open) + self._connecting
        if self._waiting and not self._closed and busy < self.size:
            self._spawn_open()

    def _expire(self, pending: _Pending) -> None:
        if pending.finished:
            return
        conn = pending.conn
        if conn is not None and conn.current is pending:
            # The answer may still come on this connection; it cannot carry another request.
            conn.current = None
            conn._abort()
        self._finish(pending, 0, None, b"", "timeout")

    def _finish(
        self,
        pending: _Pending,
        status: int,
        header_length: int | None,
        body: bytes,
        err: str | None,
    ) -> None:
        if pending.finished:
            return
        pending.finished = True
        pending.done(status, header_length, body, err)

    async def close(self) -> None:
        """Drop every connection; requests still waiting get no callback."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pending in self._deadlines:
            pending.finished = True
        self._deadlines.clear()
        self._waiting.clear()
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes
