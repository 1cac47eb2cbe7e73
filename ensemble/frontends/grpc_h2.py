"""OIP gRPC on uvicorn's HTTP/2 (zttp) instead of gRPC core: the same RPCs, cheaper per call.

gRPC is HTTP/2 with a framing of its own: a POST to ``/<service>/<method>`` with content type
``application/grpc``, a body of length-prefixed messages (one for a unary call), the answer's
status in trailers (``grpc-status``, ``grpc-message``). The gateway serves unary RPCs only, so
this module speaks that subset as an ASGI application on uvicorn's HTTP/2 protocol, on the event
loop the gateway already runs: no gRPC core, no poller thread handing each call across threads.
The handlers are ``grpc.rpc_handlers``: both stacks answer alike, statuses included.

The connections are ``h2_connections.GatewayH2Protocol``'s: the frontend's limits, and retirement
before zttp's lifetime budgets per connection (past them zttp drops a connection with its calls).

Requests may come compressed (``grpc-encoding`` gzip or deflate, inflated within
``max_request_bytes``); answers go uncompressed, which every client accepts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import re
import socket
import ssl
import struct
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, NoReturn, TypeAlias

import grpc

from ensemble.auth import ApiKeys, BearerToken
from ensemble.control.lifecycle import ModelLifecycle
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.frontends.connections import ConnectionLimits, QuietUvicorn, listen
from ensemble.frontends.deadlines import ReadDeadlines
from ensemble.frontends.grpc import SERVICE_NAME, UnaryHandler, rpc_handlers
from ensemble.frontends.h2_connections import GatewayH2Protocol, H2Guard
from ensemble.frontends.limits import Offload, RequestLimits
from ensemble.frontends.tls_accept import tls_protocol

log = logging.getLogger(__name__)

Scope: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]

RESERVED_METADATA: Final = frozenset(
    {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
)
"""Headers that carry the protocol itself, not the caller's metadata."""
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNIT: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_WBITS: Final = {b"gzip": 31, b"deflate": 15}
"""zlib's window bits for each message encoding a client may send (answers are identity)."""
ACCEPTED_ENCODINGS: Final = "identity,deflate,gzip"
_RESPONSE_HEADERS: Final = [
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", ACCEPTED_ENCODINGS.encode()),
]


class H2Abort(grpc.aio.AbortError):  # type: ignore[misc]
    """A call ended with a status other than OK (``H2Call.abort``)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing


class H2Call:
    """What a handler may ask of its call: the caller's metadata, the time left, an abort.
    The subset of grpc.aio's ServicerContext the gateway's handlers use."""

    __slots__ = ("_deadline", "_headers", "_loop", "_metadata")

    def __init__(self, headers: list[tuple[bytes, bytes]], timeout_s: float | None) -> None:
        self._headers = headers
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self._loop = asyncio.get_running_loop()
        self._deadline = None if timeout_s is None else self._loop.time() + timeout_s

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The caller's metadata (decoded when first asked: most calls never ask)."""
        if self._metadata is None:
            self._metadata = metadata_of(self._headers)
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._loop.time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        raise H2Abort(code, details, tuple(trailing_metadata))


def parse_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` header (``100m``: 100 ms); ValueError when malformed."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"malformed grpc-timeout {value[:32]!r}")
    return int(match.group(1)) * _TIMEOUT_UNIT[match.group(2)]


def encode_message(text: str) -> bytes:
    """``grpc-message``'s percent-encoding: printable ASCII but ``%`` as is, other bytes %XX."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def metadata_of(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata from the request headers, as grpc.aio gives it: ``-bin`` values
    decoded from base64, others as text; the protocol's own headers left out."""
    out: list[tuple[str, str | bytes]] = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name in RESERVED_METADATA:
            continue
        if name.endswith("-bin"):
            padded = raw_value + b"=" * (-len(raw_value) % 4)
            with contextlib.suppress(ValueError):
                out.append((name, base64.b64decode(padded)))
            continue
        out.append((name, raw_value.decode("latin-1")))
    return tuple(out)


class GrpcApp:
    """gRPC unary calls as an ASGI application over the gateway's RPC handlers."""

    def __init__(
        self,
        handlers: dict[str, tuple[UnaryHandler, Any]],
        max_message_bytes: int,
        max_header_bytes: int = 64 * 1024,
        offload: Offload | None = None,
        read_timeout_s: float = 60.0,
    ) -> None:
        prefix = f"/{SERVICE_NAME}/"
        self.handlers = {prefix + name: pair for name, pair in handlers.items()}
        self.max_message_bytes = max_message_bytes
        self.max_header_bytes = max_header_bytes
        """Metadata a call may carry (zttp itself refuses header blocks over 64 KiB)."""
        self.offload = offload or Offload(RequestLimits(max_bytes=max_message_bytes))
        """The thread large compressed messages are inflated in."""
        self.deadlines = ReadDeadlines(read_timeout_s)
        """The messages arriving, each within ``server.read_timeout_s`` of its call's start."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        fields = dict(headers)
        if scope["method"] != "POST":
            await _plain(send, 405, b"gRPC calls are POST requests")
            return
        if not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            await _plain(send, 415, b"content-type must be application/grpc")
            return
        if fields.get(b"te") != b"trailers":
            await _plain(send, 400, b"gRPC needs te: trailers (the status travels in trailers)")
            return
        try:
            payload = await self._call(scope["path"], fields, headers, receive)
        except H2Abort as exc:
            await _answer(send, b"", exc.code, exc.details, exc.trailing)
            return
        await _answer(send, payload, grpc.StatusCode.OK, "", ())

    async def _call(
        self,
        path: str,
        fields: dict[bytes, bytes],
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
    ) -> bytes:
        """The framed response of one call; H2Abort for any other status."""
        size = sum(len(name) + len(value) for name, value in headers)
        if size > self.max_header_bytes:
            raise H2Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"metadata of {size} bytes exceeds {self.max_header_bytes} "
                "(server.max_header_bytes)",
            )
        pair = self.handlers.get(path)
        if pair is None:
            raise H2Abort(grpc.StatusCode.UNIMPLEMENTED, f"method {path[:200]!r} not found")
        encoding = fields.get(b"grpc-encoding", b"identity")
        if encoding != b"identity" and encoding not in _WBITS:
            name = encoding[:32].decode("latin-1")
            raise H2Abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {name!r} is not supported ({ACCEPTED_ENCODINGS})",
                (("grpc-accept-encoding", ACCEPTED_ENCODINGS),),
            )
        timeout_s = None
        if b"grpc-timeout" in fields:
            try:
                timeout_s = parse_timeout(fields[b"grpc-timeout"])
            except ValueError as exc:
                raise H2Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        body = await self._body(receive)
        wbits = _WBITS.get(encoding)
        limit = self.max_message_bytes
        raw = await self.offload.run(len(body), lambda: _unframe(body, wbits, limit))
        handle, _ = pair
        call = H2Call(headers, timeout_s)
        try:
            if timeout_s is None:
                message = await handle(raw, call)
            else:
                async with asyncio.timeout(timeout_s):
                    message = await handle(raw, call)
        except TimeoutError:
            raise H2Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except H2Abort:
            raise
        except Exception:
            log.exception("gRPC %s failed", path[:200])
            raise H2Abort(grpc.StatusCode.INTERNAL, "internal error; see the gateway log") from None
        answer: bytes = message.SerializeToString()
        return struct.pack(">BI", 0, len(answer)) + answer

    async def _body(self, receive: Receive) -> bytes:
        """The request body, refused once it holds more than one message may or takes longer
        than ``read_timeout_s`` from the call's headers (a stream opened and never sent on
        must not hold a call slot)."""
        parts: list[bytes] = []
        size = 0

        async def more() -> bool:
            nonlocal size
            message = await receive()
            if message["type"] == "http.disconnect":
                raise H2Abort(grpc.StatusCode.CANCELLED, "the client went away")
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_message_bytes + 5:
                raise H2Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"message larger than max ({size - 5} vs. {self.max_message_bytes} bytes)",
                )
            parts.append(part)
            following: bool = message.get("more_body", False)
            return following

        async def whole() -> None:
            while await more():
                pass

        try:
            await self.deadlines.read(whole())
        except TimeoutError:
            raise H2Abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the message did not arrive within {self.deadlines.timeout_s:g} s "
                "(server.read_timeout_s)",
            ) from None
        return b"".join(parts)


def _unframe(body: bytes, wbits: int | None, limit: int) -> bytes:
    """The one message of a unary call's body (1 byte compressed flag, 4 bytes length),
    inflated when compressed with the call's encoding (zlib ``wbits``), within ``limit``."""
    if len(body) < 5:
        raise H2Abort(grpc.StatusCode.INTERNAL, "a unary call carries exactly one message")
    flag, length = struct.unpack_from(">BI", body)
    if len(body) != 5 + length:
        raise H2Abort(grpc.StatusCode.INTERNAL, "a unary call carries exactly one message")
    if flag == 0:
        return body[5:]
    if wbits is None:
        raise H2Abort(grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
    inflate = zlib.decompressobj(wbits)
    try:
        message = inflate.decompress(body[5:], limit + 1)
    except zlib.error as exc:
        raise H2Abort(grpc.StatusCode.INTERNAL, f"corrupt compressed message: {exc}") from None
    if len(message) > limit:
        raise H2Abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"message inflates past max ({limit} bytes)",
        )
    if not inflate.eof:
        raise H2Abort(grpc.StatusCode.INTERNAL, "truncated compressed message")
    return message


async def _answer(
    send: Send,
    payload: bytes,
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str], ...],
) -> None:
    trailers = [(b"grpc-status", b"%d" % code.value[0])]
    if details:
        trailers.append((b"grpc-message", encode_message(details[:4000])))
    trailers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trailing]
    start = {"type": "http.response.start", "status": 200, "trailers": True}
    await send({**start, "headers": _RESPONSE_HEADERS})
    await send({"type": "http.response.body", "body": payload})
    await send({"type": "http.response.trailers", "headers": trailers})


async def _plain(send: Send, status: int, text: bytes) -> None:
    """An answer for a request that is not a gRPC call at all."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


class H2GrpcServer:
    """The running server: ``stop(grace)`` as grpc.aio's server has."""

    def __init__(self, server: QuietUvicorn, task: asyncio.Task[None], sock: socket.socket) -> None:
        self._server = server
        self.task = task
        self._sock = sock

    async def stop(self, grace: float | None) -> None:
        if grace is not None:  # calls in flight get this long (else the drain timeout)
            self._server.config.timeout_graceful_shutdown = max(1, int(grace))
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task
        self._sock.close()  # uvicorn closes what it made of the socket, not the socket


async def start_h2_grpc_server(
    dispatcher: Dispatcher,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    limits: RequestLimits | None = None,
    offload: Offload | None = None,
    connections: ConnectionLimits | None = None,
    tls: ssl.SSLContext | None = None,
    api_keys: ApiKeys | None = None,
    reuse_port: bool = False,
    lifecycle: ModelLifecycle | None = None,
    admin: BearerToken | None = None,
    drain_timeout_s: float = 1.0,
) -> tuple[H2GrpcServer, int]:
    """``grpc.start_grpc_server``'s twin on uvicorn's HTTP/2: the same RPCs, limits and
    options; clear-text HTTP/2 with prior knowledge (as gRPC clients speak), or TLS given a
    context (offering ALPN ``h2``)."""
    limits = limits or RequestLimits(max_bytes=max_message_bytes)
    offload = offload or Offload(limits)
    handlers = rpc_handlers(dispatcher, limits, offload, api_keys, lifecycle, admin)
    conns = connections or ConnectionLimits()
    app = GrpcApp(
        handlers, max_message_bytes, conns.max_header_bytes, offload, limits.read_timeout_s
    )
    guard = H2Guard(conns, dispatcher.metrics)

    # uvicorn builds each connection's protocol from this (any factory works).
    protocol: Any = functools.partial(GatewayH2Protocol, guard=guard)
    if tls is not None:
        protocol = tls_protocol(protocol, tls, guard)
    server = QuietUvicorn.of(
        app,
        protocol,
        idle_timeout_s=conns.idle_timeout_s,
        drain_timeout_s=drain_timeout_s,
        http_headers=False,
    )
    sock = listen(host, port, reuse_port=reuse_port)
    task = await server.start(sock)
    bound: int = sock.getsockname()[1]
    return H2GrpcServer(server, task, sock), bound
