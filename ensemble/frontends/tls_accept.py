"""TLS on the uvicorn-served frontends, within the gateway's connection limits.

Handed an SSL context, asyncio (and so uvicorn) gives each handshake 60 s and tells the
application of a connection only once its handshake is done: connections still shaking hands
escape the frontend's cap and its head timer. Here the listener takes plain TCP and every
accepted connection is wrapped in the running loop's own TLS protocol (uvloop's, or asyncio's)
by ``tls_protocol``: counted against ``max_connections`` from its accept, given
``header_timeout_s`` to finish its handshake, and, when the frontend is full, closed to make
room if it has waited longest of the connections without a request (``OpenConnections.
make_room``).
Go's net/http bounds the handshake the same way, by its head timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import uvloop

if TYPE_CHECKING:
    from ensemble.frontends.connections import OpenConnections

BACKSTOP = 2.0
"""The loop's own handshake timeout, as a multiple of the frontend's: this module's timer
(which counts the close as ``header_timeout``) always fires first."""


class _Handshake:
    """What the gateway adds to the loop's TLS protocol: its accept counted, its handshake
    timed, room made for it. A mixin ahead of the TLS protocol class in the bases."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        guard: OpenConnections,
    ) -> None:
        timeout = guard.limits.header_timeout_s
        super().__init__(  # type: ignore[call-arg]
            loop,
            app,
            context,
            None,
            server_side=True,
            ssl_handshake_timeout=timeout * BACKSTOP,
            ssl_shutdown_timeout=timeout,
        )
        self.app = app
        self.guard = guard
        self.loop = loop
        self.started = loop.time()
        """When it was accepted (the loop's clock): the oldest handshake goes first."""
        self.raw: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        raw = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        guard.handshaking[self.app] = self
        full = len(guard.handshaking) + guard.open > guard.limits.max_connections
        if full and not guard.make_room(self.app):
            del guard.handshaking[self.app]
            guard.metrics.record_connection_closed(guard.label, "limit")
            raw.abort()  # before any TLS work: nothing to unwind when it is lost
            return
        self.raw = raw
        self.timer = self.loop.call_later(guard.limits.header_timeout_s, self._late)
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.guard.handshaking.pop(self.app, None)
        if self.raw is not None:
            super().connection_lost(exc)  # type: ignore[misc]

    def _late(self) -> None:
        if self.guard.handshaking.pop(self.app, None) is not None:
            self.close_for("header_timeout")

    def close_for(self, reason: str) -> None:
        """Close it in its handshake, for ``reason`` (counted)."""
        self.guard.metrics.record_connection_closed(self.guard.label, reason)
        if self.raw is not None:
            self.raw.abort()


class _UvloopHandshake(_Handshake, uvloop.loop.SSLProtocol):  # type: ignore[misc,name-defined]
    pass


class _AsyncioHandshake(_Handshake, sslproto.SSLProtocol):
    pass


def tls_protocol(
    factory: Callable[..., asyncio.BaseProtocol],
    context: ssl.SSLContext,
    guard: OpenConnections,
) -> Callable[..., asyncio.BaseProtocol]:
    """``factory`` (uvicorn's protocol class, or any callable making a connection's protocol)
    behind TLS with ``context``, counted and timed by ``guard``'s limits; the listener itself
    is given no SSL context."""

    def build(*args: Any, **kwargs: Any) -> asyncio.BaseProtocol:
        app = factory(*args, **kwargs)
        loop = asyncio.get_running_loop()
        tls = _UvloopHandshake if isinstance(loop, uvloop.Loop) else _AsyncioHandshake
        protocol: asyncio.BaseProtocol = tls(loop, app, context, guard)
        return protocol

    return build
