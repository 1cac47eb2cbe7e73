"""An HTTP request body read within its limits: bytes, time, inflation and values."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeAlias

from ensemble.errors import (
    EnsembleError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from ensemble.frontends.deadlines import ReadDeadlines
from ensemble.frontends.limits import Offload, RequestLimits, ValueGuard

Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]

INFLATE_STEP_BYTES = 256 * 1024
"""Inflated bytes produced per zlib call, so limits are checked while a body inflates."""


async def read_body(
    receive: Receive,
    headers: Mapping[str, str],
    limits: RequestLimits,
    offload: Offload,
    deadlines: ReadDeadlines,
    guard: ValueGuard | None = None,
) -> bytes:
    """The body, inflated when it is gzip or deflate; raises the EnsembleError a client gets
    for a body too large, too slow (``deadlines``: the frontend's, of ``read_timeout_s``),
    inflating too far, holding too many values (``guard``) or not valid compressed data.
    Large bodies inflate in the offload thread."""
    limit = limits.max_bytes
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} "
            "(server.max_request_bytes)"
        )
    encoding = headers.get("content-encoding", "identity").lower()
    compressed = encoding not in ("identity", "")
    if compressed and encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"unsupported Content-Encoding {encoding[:64]!r}; use gzip or deflate"
        )
    try:
        body = await deadlines.read(_receive(receive, limit, None if compressed else guard))
    except TimeoutError:
        raise RequestTimeout(
            f"request body not received within {deadlines.timeout_s:g} s (server.read_timeout_s)"
        ) from None
    if not compressed:
        return body
    return await offload.run(len(body), lambda: inflate(body, encoding, limits, guard))


async def _receive(receive: Receive, limit: int, guard: ValueGuard | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise EnsembleError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {limit} bytes (server.max_request_bytes)"
            )
        if guard is not None:
            guard.feed(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def inflate(
    body: bytes, encoding: str, limits: RequestLimits, guard: ValueGuard | None = None
) -> bytes:
    """Inflate a step at a time, so neither a bomb's size nor its values are ever held: the
    output may reach ``limits.inflated_bytes(len(body))`` and ``guard`` sees every step."""
    cap = limits.inflated_bytes(len(body))
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    size = 0
    data = body
    try:
        while True:
            piece = inflater.decompress(data, INFLATE_STEP_BYTES)
            size += len(piece)
            if size > cap:
                raise PayloadTooLarge(_too_far(len(body), cap, limits))
            if guard is not None:
                guard.feed(piece)
            pieces.append(piece)
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(piece) < INFLATE_STEP_BYTES):
                break
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {encoding} data: {exc}") from None
    # zlib stops quietly at a truncated stream or at the end of the first one: neither is a body.
    if not inflater.eof:
        raise InvalidInput(f"body is truncated {encoding} data")
    if inflater.unused_data:
        raise InvalidInput(
            f"body has {len(inflater.unused_data)} bytes after the end of its {encoding} data "
            "(several gzip members are not supported)"
        )
    return b"".join(pieces)


def _too_far(compressed: int, cap: int, limits: RequestLimits) -> str:
    if cap < limits.max_bytes:
        return (
            f"request body inflates past {limits.max_inflate_ratio:g} times its {compressed} "
            "bytes (server.max_inflate_ratio)"
        )
    return (
        f"decompressed request body exceeds the limit of {limits.max_bytes} bytes "
        "(server.max_request_bytes)"
    )
