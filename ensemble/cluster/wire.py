"""Frames between the hub and its workers: a 4-byte length, then a pickled tuple.

Pickle is safe here only because both ends are processes of one gateway, started by one
supervisor, talking over a Unix socket in a directory only its user can open.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

MAX_FRAME_BYTES = 256 * 1024 * 1024
"""Largest frame either end reads (a metrics snapshot or a learned state is far smaller)."""

_HEADER = struct.Struct("!I")


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def unframe(data: bytes) -> tuple[Any, ...]:
    """The message of one whole frame (a frame that travels as a Ray object, not a stream)."""
    message = pickle.loads(data[_HEADER.size :])
    assert isinstance(message, tuple)
    return message


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None when the other end closed the connection."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = pickle.loads(body)
    assert isinstance(message, tuple)
    return message
