"""What one request may cost both frontends: bytes, inflation, tensor elements, time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ensemble.config import ServerConfig
from ensemble.errors import PayloadTooLarge
from ensemble.types import ModelMetadata

T = TypeVar("T")

INFLATE_FLOOR_BYTES = 1024 * 1024
"""Bodies inflating to at most this many bytes are exempt from the inflation ratio: a small
batch of zeros compresses far better than 100:1, and is harmless."""

SEPARATOR_SLACK = 65_536
"""Commas a JSON body may hold beyond its values (keys, shapes, parameters, strings)."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The per-request limits of the config's ``server:`` section, in one place."""

    max_bytes: int = 64 * 1024 * 1024
    max_inflate_ratio: float = 100.0
    max_elements: int = 4 * 1024 * 1024
    max_batch_size: int = 1024
    offload_bytes: int = 64 * 1024
    read_timeout_s: float = 60.0

    @classmethod
    def of(cls, server: ServerConfig) -> RequestLimits:
        return cls(
            max_bytes=server.max_request_bytes,
            max_inflate_ratio=server.max_inflate_ratio,
            max_elements=server.max_request_elements,
            max_batch_size=server.max_batch_size,
            offload_bytes=server.decode_offload_bytes,
            read_timeout_s=server.read_timeout_s,
        )

    def inflated_bytes(self, compressed: int) -> int:
        """Most bytes a compressed body of ``compressed`` bytes may inflate to."""
        by_ratio = int(compressed * self.max_inflate_ratio)
        return min(self.max_bytes, max(INFLATE_FLOOR_BYTES, by_ratio))

    def elements(self, meta: ModelMetadata) -> int:
        """Most tensor elements a request to this model may carry: ``max_batch_size`` rows of
        every input (an input with other variable dimensions: ``max_elements``)."""
        total = 0
        for spec in meta.inputs:
            shape = spec.shape
            if any(d < 0 for d in shape[1:]):
                return self.max_elements
            rows = self.max_batch_size if shape and shape[0] < 0 else (shape[0] if shape else 1)
            total += rows * math.prod(shape[1:])
        return min(total, self.max_elements)


def counts_values(meta: ModelMetadata) -> bool:
    """Whether a JSON body for this model can be judged by its commas: not when an input is
    BYTES, whose strings may hold any number of them."""
    return all(spec.datatype != "BYTES" for spec in meta.inputs)


class ValueGuard:
    """Refuses a JSON body holding more values than ``limit`` while its bytes arrive, before
    anything is parsed: an array of n values has n - 1 commas, and ``bytes.count`` finds them
    at memory speed. Commas inside strings count too, hence the slack."""

    __slots__ = ("_commas", "_seen", "json_end", "limit", "model")

    def __init__(self, limit: int, model: str, json_end: int | None = None) -> None:
        self.limit = limit
        self.model = model
        self.json_end = json_end
        """Where the JSON part ends (the binary extension's header length); None: at the end."""
        self._seen = 0
        self._commas = 0

    def feed(self, chunk: bytes) -> None:
        end = len(chunk)
        if self.json_end is not None:
            end = min(end, self.json_end - self._seen)
        self._seen += len(chunk)
        if end <= 0:
            return
        self._commas += chunk.count(b",", 0, end)
        if self._commas > self.limit + SEPARATOR_SLACK:
            raise PayloadTooLarge(
                f"request body holds more than {self.limit:,} values, the most model "
                f"{self.model!r} takes in one request (server.max_batch_size rows, at most "
                "server.max_request_elements); send fewer rows per request"
            )


class Offload:
    """One worker thread for decoding large requests, so the event loop keeps serving others
    meanwhile (zlib releases the GIL while it inflates; JSON is bounded by ``ValueGuard``)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ensemble-decode")

    async def run(self, size: int, fn: Callable[[], T]) -> T:
        """``fn()`` inline when ``size`` is small, else in the worker thread."""
        if size <= self.limits.offload_bytes:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
