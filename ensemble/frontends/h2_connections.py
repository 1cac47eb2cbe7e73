"""The uvicorn gRPC stack's connections: uvicorn's HTTP/2 protocol (zttp) with the gateway's
connection limits, retirement before zttp's lifetime budgets, and coalesced writes."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import zttp
from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol

from ensemble.frontends.connections import CoalescedWrites, ConnectionLimits, OpenConnections
from ensemble.metrics import GatewayMetrics

RETIRE_AFTER_STREAMS: Final = 3584
"""Streams a connection serves before it is retired: zttp's budget (4096) less room for the
streams a client opens before it reads the GOAWAY (at most the concurrency cap, 128)."""
RETIRE_AFTER_RESETS: Final = 192
"""Resets by the client (cancelled calls) a connection takes before it is retired: zttp's
budget (256) less room for those that cross the GOAWAY."""
REFUSED_STREAM: Final = 0x7
LINGER_S: Final = 1.0
"""How long a retired connection reads and drops what still arrives before it closes."""
HANDSHAKE_BYTES: Final = 24 + 9
"""The client preface and one frame header: the connection has begun to speak HTTP/2."""


class H2Guard(OpenConnections):
    """The uvicorn gRPC stack's connections: how many are open, against the cap (shown beside
    the HTTP frontend's in ``ensemble_open_connections``); at the cap, as the HTTP frontend's,
    one that never spoke HTTP/2, else one idle between calls, is closed to make room."""

    def __init__(self, limits: ConnectionLimits, metrics: GatewayMetrics) -> None:
        super().__init__(limits, metrics, "grpc")
        others = metrics.open_connections
        metrics.open_connections = lambda: (
            *(pair for pair in others() if pair[0] != "grpc"),
            ("grpc", self.open),
        )


class GatewayH2Protocol(ZttpH2Protocol):
    """uvicorn's HTTP/2 protocol (the uvicorn gRPC stack's) with the gateway's connection
    limits (cap, handshake and idle timeouts, age) and graceful retirement.

    zttp keeps lifetime budgets per connection (4096 streams opened, 256 resets by the peer)
    and answers the next stream past either with GOAWAY ENHANCE_YOUR_CALM, failing the calls
    in flight. Well before, a connection is retired: GOAWAY NO_ERROR naming the last stream it
    serves, later streams refused (REFUSED_STREAM: clients retry them on a new connection),
    the connection closed lingering once its last call answers. ``grpc_max_connection_age_s``
    retires the same way."""

    def __init__(self, *args: Any, guard: H2Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._received = 0
        self._streams = 0
        self._resets = 0
        self._last_served: int | None = None
        """The last stream served once a GOAWAY went out; later ones are refused."""
        self._timers: list[asyncio.TimerHandle] = []
        self._lingering = False
        self._highest_seen = 0
        self._running = 0
        """Calls started on this connection and not yet finished, reset streams' included."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescedWrites(  # type: ignore[assignment]
            transport, self.loop, lambda: self.guard.closed(self, transport)
        )
        guard = self.guard
        guard.handshaking.pop(self, None)  # over TLS: the handshake is done
        guard.open += 1
        if guard.open > guard.limits.max_connections and not guard.make_room():
            self.close("limit")
            return
        guard.fresh[self] = self.loop.time()  # until it speaks HTTP/2
        limits = guard.limits
        self._timers.append(self.loop.call_later(limits.header_timeout_s, self._handshake_late))
        if limits.grpc_max_connection_age_s is not None:
            self._timers.append(self.loop.call_later(limits.grpc_max_connection_age_s, self._aged))

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self.guard.forget(self)
        self.guard.gone(self)
        for timer in self._timers:
            timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()  # closes the connection now when no call is on it
        self.guard.finish_closing(self)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._received += len(data)
        if self._received >= HANDSHAKE_BYTES and self.guard.fresh.pop(self, None) is not None:
            self.guard.idle[self] = self.loop.time()  # it speaks HTTP/2: idle until a call
        super().data_received(data)

    def handle_request(self, event: zttp.Request) -> None:
        self._streams += 1
        self._highest_seen = max(self._highest_seen, event.stream_id)
        retired = self._last_served is not None and event.stream_id > self._last_served
        # zttp counts live streams; a stream the client reset is gone from its count while
        # its call still runs here. Calls running, not streams open, are what is capped, so
        # resetting streams (Rapid Reset) cannot start more work than open ones could.
        if retired or self._running >= self.guard.limits.grpc_max_concurrent_streams:
            self.conn.stream(event.stream_id).reset(REFUSED_STREAM)  # the client may retry
            return
        self._running += 1
        self.guard.idle.pop(self, None)
        super().handle_request(event)
        if self._streams >= RETIRE_AFTER_STREAMS:
            self.retire(self._highest_seen)

    def on_response_complete(self, stream_id: int) -> None:
        self._running -= 1  # uvicorn calls this once per call, answered or not
        if not self._running and not self.transport.is_closing():
            self.guard.idle[self] = self.loop.time()
        super().on_response_complete(stream_id)

    def handle_rst_stream(self, event: zttp.RstStream) -> None:
        self._resets += 1
        super().handle_rst_stream(event)
        if self._resets >= RETIRE_AFTER_RESETS:
            self.retire(self._highest_seen)  # every stream begun is still served

    def retire(self, last_stream_id: int) -> None:
        """Serve no stream after ``last_stream_id``: GOAWAY NO_ERROR naming it now, the
        connection closed once its calls end (uvicorn's shutdown path)."""
        if self._last_served is not None or self.transport.is_closing():
            return
        self._last_served = last_stream_id
        self.conn.close(0, last_stream_id)
        self.flush()
        self.shutdown_requested = True
        if not self.cycles:
            self._close_connection()

    def _close_connection(self) -> None:
        """GOAWAY and close. A retired connection's GOAWAY names the same last stream again
        (a later one may not raise it: clients retry only the streams above it), and it
        closes lingering: closed at once, the kernel would answer the client's unread frames
        with a reset and drop the last answers still queued for it. So only the writing side
        closes; what arrives is discarded until the client closes too, or ``LINGER_S``."""
        if self._last_served is None:
            super()._close_connection()
            return
        if self.transport.is_closing() or self._lingering:
            return
        self.conn.close(0, self._last_served)
        self.flush()
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timers.append(self.loop.call_later(LINGER_S, self.transport.close))

    def _handshake_late(self) -> None:
        if self._received < HANDSHAKE_BYTES:
            self.close("header_timeout")

    def _aged(self) -> None:
        """``grpc_max_connection_age_s`` passed: retire (counted as ``max_age``), and close
        after a grace period of ``idle_timeout_s`` whatever is still in flight."""
        if self._last_served is not None or self.transport.is_closing():
            return
        self.guard.metrics.record_connection_closed("grpc", "max_age")
        self.retire(self._highest_seen)
        grace = self.guard.limits.idle_timeout_s
        self._timers.append(self.loop.call_later(grace, self.transport.close))

    def timeout_keep_alive_handler(self) -> None:
        self.guard.metrics.record_connection_closed("grpc", "idle_timeout")
        super().timeout_keep_alive_handler()

    def close(self, reason: str) -> bool:
        """Close this connection for ``reason`` (counted); False if it was closing already.
        A connection closed to make room has no call running: its client reconnects for the
        next one."""
        if self.transport.is_closing():
            return False
        self.guard.metrics.record_connection_closed("grpc", reason)
        if self._received >= HANDSHAKE_BYTES:  # it speaks HTTP/2: GOAWAY first
            # A call the client started meanwhile is past the last stream named: it knows
            # the call was not served and retries it on a new connection.
            self.conn.close(0, self._highest_seen)
            self.flush()
        self.transport.close()
        return True
