"""What client connections may cost: a cap per frontend, head and idle timeouts, head size.

HTTP: uvicorn's httptools protocol with the limits added (uvicorn has no head timeout, times
no connection before its first request, and lets a head grow without bound). gRPC: the same
limits as gRPC core channel arguments, or held by the uvicorn gRPC stack's HTTP/2 protocol
(``h2_connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ensemble.config import ServerConfig
from ensemble.metrics import GatewayMetrics

log = logging.getLogger("ensemble.connections")

RESERVED_DESCRIPTORS = 1024
"""Descriptors kept for everything but client connections: replica clients, files, Ray."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The connection limits of the config's ``server:`` section."""

    max_connections: int = 4096
    header_timeout_s: float = 10.0
    write_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    grpc_max_concurrent_streams: int = 128
    grpc_max_connection_age_s: float | None = None

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            max_connections=server.max_connections,
            header_timeout_s=server.header_timeout_s,
            write_timeout_s=server.write_timeout_s,
            idle_timeout_s=server.idle_timeout_s,
            max_header_bytes=server.max_header_bytes,
            grpc_max_concurrent_streams=server.grpc_max_concurrent_streams,
            grpc_max_connection_age_s=server.grpc_max_connection_age_s,
        )

    def fit_descriptors(self) -> ConnectionLimits:
        """These limits with the cap lowered, if need be, so both frontends at their caps still
        leave ``RESERVED_DESCRIPTORS`` free; raises the soft descriptor limit to the hard one
        first (as Go's runtime does), since each connection holds one."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        room = max(64, (soft - RESERVED_DESCRIPTORS) // 2)
        if self.max_connections <= room:
            return self
        log.warning(
            "server.max_connections %d lowered to %d per frontend: the process may open %d "
            "descriptors (ulimit -n)",
            self.max_connections,
            room,
            soft,
        )
        return replace(self, max_connections=room)

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC core's channel arguments for these limits."""
        options = [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.server_handshake_timeout_ms", int(self.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1000)),
            ("grpc.max_concurrent_streams", self.grpc_max_concurrent_streams),
            ("grpc.max_metadata_size", self.max_header_bytes),
        ]
        if self.grpc_max_connection_age_s is not None:
            age_ms = int(self.grpc_max_connection_age_s * 1000)
            options += [
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", int(self.idle_timeout_s * 1000)),
            ]
        return options


class QuietUvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: the gateway drains its frontends together."""

    @classmethod
    def of(
        cls,
        app: Any,
        protocol: Any,
        *,
        idle_timeout_s: float,
        drain_timeout_s: float,
        http_headers: bool = True,
    ) -> QuietUvicorn:
        """A server for one of the gateway's frontends: ``protocol`` builds each connection
        (any factory works; ``tls_accept.tls_protocol`` puts TLS in front of one: uvicorn's
        own listener takes plain TCP), ``idle_timeout_s`` is its keep-alive;
        ``http_headers``: answers carry ``server`` and ``date`` (HTTP wants a date; gRPC
        answers need neither)."""
        idle: Any = idle_timeout_s  # uvicorn arms it with loop.call_later; its `int` hint is narrow
        config = uvicorn.Config(
            app,
            lifespan="off",
            http=protocol,
            loop="none",
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # no proxy in front to trust; its middleware costs per request
            timeout_graceful_shutdown=int(drain_timeout_s) or 1,
            timeout_keep_alive=idle,
            server_header=http_headers,
            date_header=http_headers,
        )
        return cls(config)

    async def start(self, sock: socket.socket) -> asyncio.Task[None]:
        """Serve on ``sock``; returns once listening, re-raising why it could not start."""
        task = asyncio.create_task(self.serve(sockets=[sock]))
        while not self.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during start-up")
            await asyncio.sleep(0.01)
        return task

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), SO_REUSEPORT when the
    gateway's workers share it; OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(socket.SOMAXCONN)  # the kernel caps it at net.core.somaxconn
    sock.setblocking(False)
    return sock


class CoalescedWrites:
    """A transport whose writes within one event-loop iteration leave in one socket write
    (writev, no copy): uvicorn writes an HTTP answer's head and body apart, and its HTTP/2
    protocol a gRPC answer's headers, message and trailers, a system call each."""

    __slots__ = ("_closed", "_ended", "_loop", "_pending", "_scheduled", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        closed: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False
        self._ended = False
        self._closed = closed
        """Told when the connection is closed here (it may take a while to be gone)."""

    def write(self, data: bytes) -> None:
        if not data or self._ended:  # nothing leaves after the end of the stream
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending:
            pending, self._pending = self._pending, []
            if not self._transport.is_closing():  # lost meanwhile: nowhere to send them
                self._transport.writelines(pending)

    def write_eof(self) -> None:
        self._flush()
        self._ended = True
        self._transport.write_eof()

    def is_closing(self) -> bool:  # asked for on every answer
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()
        starting = not self._transport.is_closing()  # not already closing (or lost)
        self._transport.close()
        if starting and self._closed is not None:
            self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OpenConnections:
    """One frontend's connections against its cap: how many are open, and (over TLS) those
    accepted and still in their handshake, which count too (``tls_accept``)."""

    def __init__(self, limits: ConnectionLimits, metrics: GatewayMetrics, label: str) -> None:
        self.limits = limits
        self.metrics = metrics
        self.label = label
        """The frontend's ``protocol`` label on the connection metrics."""
        self.open = 0
        """Connections whose protocol was told of them (after TLS, once the handshake is
        done)."""
        self.handshaking: dict[object, Any] = {}
        """Connections in their TLS handshake by their protocol, oldest first."""
        self.fresh: dict[Any, float] = {}
        """Connections that never sent a whole request (HTTP: a head; gRPC: the HTTP/2
        preface), since when (the loop's clock), oldest first; each has ``close(reason)``."""
        self.idle: dict[Any, float] = {}
        """Connections idle after a request (call), since when, oldest first."""
        self.closing: dict[object, asyncio.Transport] = {}
        """Connections closed here and not gone yet, by their protocol, oldest first: a TLS
        connection waits for the client's close_notify (``header_timeout_s`` at most), and
        any waits for its last bytes to leave. They still count, so they are the first to go
        when room is needed: aborted, which only skips that wait."""

    def closed(self, conn: object, transport: asyncio.Transport) -> None:
        """``conn`` was closed here; ``transport`` aborts it. Kept when it will linger: a TLS
        connection, or one with bytes still to send (a plain one is gone at once)."""
        if transport.get_extra_info("sslcontext") is not None or transport.get_write_buffer_size():
            self.closing[conn] = transport

    def gone(self, conn: object) -> None:
        """``conn``'s connection is lost."""
        self.closing.pop(conn, None)

    def make_room(self, newcomer: object = None) -> bool:
        """Make room for ``newcomer`` (a new connection; with TLS, its protocol, in its
        handshake): abort the oldest connection closed here and still lingering, else close
        whichever waited longest without a request, the oldest other TLS handshake or the
        oldest connection that never sent one, else the oldest idle one. False when every
        connection is in a request."""
        if self.closing:
            conn = next(iter(self.closing))
            self.closing.pop(conn).abort()
            return True
        handshake = next((h for c, h in self.handshaking.items() if c is not newcomer), None)
        waiting = self._oldest_waiting()
        if handshake is not None and (waiting is None or handshake.started <= waiting):
            del self.handshaking[handshake.app]
            handshake.close_for("evicted")
            return True
        return self._close_waiting()

    def _oldest_waiting(self) -> float | None:
        """Since when the oldest established connection that never sent a request waited."""
        return next(iter(self.fresh.values()), None)

    def _close_waiting(self) -> bool:
        """Close the oldest established connection that never sent a request, else the
        oldest idle between requests; False when there is none."""
        for waiting in (self.fresh, self.idle):
            while waiting:
                oldest = next(iter(waiting))
                del waiting[oldest]
                if oldest.close("evicted"):
                    return True
        return False

    def forget(self, conn: object) -> None:
        """``conn`` is in a request now, or gone."""
        self.fresh.pop(conn, None)
        self.idle.pop(conn, None)

    def finish_closing(self, conn: object) -> None:
        """The gateway is stopping: abort ``conn`` if it is a TLS connection closed here with
        nothing left to send, rather than wait for its client's close_notify (a plain one with
        nothing left to send is gone at once)."""
        transport = self.closing.get(conn)
        if (
            transport is not None
            and transport.get_extra_info("sslcontext") is not None
            and not transport.get_write_buffer_size()
        ):
            self.closing.pop(conn)
            transport.abort()


class ConnectionGuard(OpenConnections):
    """The HTTP frontend's connections: how many are open, and those not in a request, oldest
    first. At the cap one of these is closed to make room, so connections held open doing
    nothing cannot lock clients out: first those that never finished a request head (new,
    or sending one slowly), then those idle between requests (clients that were served)."""

    def __init__(self, limits: ConnectionLimits, metrics: GatewayMetrics) -> None:
        super().__init__(limits, metrics, "http")
        metrics.open_connections = lambda: (("http", self.open),)


class GatewayHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with the gateway's connection limits, answering unparseable HTTP
    with OIP's JSON error body (uvicorn answers in plain text before the app sees it)."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        writes = CoalescedWrites(transport, self.loop, lambda: self.guard.closed(self, transport))
        super().connection_made(writes)  # type: ignore[arg-type]
        guard = self.guard
        guard.handshaking.pop(self, None)  # over TLS: the handshake is done
        guard.open += 1
        if guard.open > guard.limits.max_connections and not guard.make_room():
            guard.metrics.record_connection_closed("http", "limit")
            self._reply_and_close(
                503,
                "too many connections (server.max_connections "
                f"{guard.limits.max_connections}); retry later",
                b"retry-after: 1\r\n",
            )
            return
        guard.fresh[self] = self.loop.time()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self.guard.forget(self)
        self.guard.gone(self)
        self._cancel_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()  # closes the connection now when no request is on it
        self.guard.finish_closing(self)

    # -- a client that does not read -----------------------------------------------------

    def pause_writing(self) -> None:
        """The send buffers are full: the answer waits for the client to read, for at most
        ``write_timeout_s`` (uvicorn would wait forever, the request holding its slot)."""
        super().pause_writing()
        if self._write_timer is None:
            timeout = self.guard.limits.write_timeout_s
            self._write_timer = self.loop.call_later(timeout, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_late(self) -> None:
        self._write_timer = None
        self.guard.metrics.record_connection_closed("http", "write_timeout")
        self.transport.abort()  # a close would wait for the buffers to drain

    def close(self, reason: str) -> bool:
        """Close this connection for ``reason`` (counted); False if it was closing already."""
        if self.transport.is_closing():
            return False
        self.guard.metrics.record_connection_closed("http", reason)
        self.transport.close()
        return True

    # -- the request head ----------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.guard.limits.header_timeout_s, self.close, "header_timeout"
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_message_begin(self) -> None:
        pipelined = self.cycle is not None and not self.cycle.response_complete
        super().on_message_begin()
        if pipelined:  # a request is still running on it: it needs no timer of its own
            self._head_bytes = 0
            return
        self._arm_head_timer()  # the head has header_timeout_s from its first byte

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.guard.limits.max_header_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")  # the parser stops; see send_400_response

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self.guard.forget(self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.guard.idle[self] = self.loop.time()  # uvicorn's keep-alive timer runs too

    def timeout_keep_alive_handler(self) -> None:
        self.close("idle_timeout")

    # -- answers without the app -----------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self.guard.metrics.record_connection_closed("http", "header_too_large")
            limit = self.guard.limits.max_header_bytes
            self._reply_and_close(
                431, f"request head exceeds {limit} bytes (server.max_header_bytes)"
            )
            return
        self.guard.metrics.record_rejection("http", "invalid_input")
        self._reply_and_close(400, f"malformed HTTP request: {msg}")

    def _reply_and_close(self, status: int, message: str, extra: bytes = b"") -> None:
        body = orjson.dumps({"error": message})
        reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}.get(
            status, b"Service Unavailable"
        )
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n%s" % (status, reason, len(body), extra, body)
        )
        self.transport.close()
