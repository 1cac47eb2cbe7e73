"""Replicas on other OIP servers: call timeouts, output checks and active health checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ensemble.errors import MemberFailed
from ensemble.oip.datatypes import numpy_to_oip
from ensemble.replicas.credentials import ClientCredentials
from ensemble.types import TensorSpec

if TYPE_CHECKING:
    from ensemble.replicas.links import Link

log = logging.getLogger("ensemble.replicas")

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How a remote replica's server is polled (Envoy's active health checking, simplified)."""

    interval_s: float = 1.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    """Consecutive failed checks that make a ready replica unready; one pass makes it ready."""


class RemoteReplica(ABC):
    """A replica served by another process, reached over OIP; subclasses speak the protocol.

    Every call is bounded by ``timeout_s`` and its outputs are checked against the local model's
    (the member's schema comes from its local ONNX file, so the server must serve the same
    model). ``start()`` polls the server's model-ready endpoint once, then every
    ``health.interval_s`` in the background; ``ready()`` follows those checks, so routing skips
    a server that is down and takes it back once it answers again.
    """

    backend = "remote"

    def __init__(
        self,
        name: str,
        tier: str,
        endpoint: str,
        model: str,
        outputs: Sequence[TensorSpec],
        *,
        timeout_s: float = 30.0,
        health: HealthCheck | None = None,
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.name = name
        self.tier = tier
        self.endpoint = endpoint
        self.credentials = credentials
        """TLS settings and API key its connections present (None: none)."""
        self.model = model
        self.timeout_s = timeout_s
        self.health = health or HealthCheck()
        self._specs = {spec.name: spec for spec in outputs}
        self._healthy = False
        self._failed_checks = 0
        self._checked_once = False
        self._watch: asyncio.Task[None] | None = None
        self._closed = False
        self.last_check_error: str | None = None
        """Why the last health check failed (None when it passed)."""
        self.check_round_trip_s: float | None = None
        """How long the last passing health check took: the network's round trip to the server
        (plus its health route's own few microseconds); None before one passed."""
        self.link: Link | None = None
        """An emulated link its health checks cross (set by the repository; calls cross it in
        ``LinkedReplica``), so a partitioned tier's servers turn unready as real ones would."""

    def __str__(self) -> str:
        return f"replica {self.name} ({self.backend} {self.endpoint}, model {self.model!r})"

    # -- what subclasses implement -----------------------------------------------------------

    @abstractmethod
    def _connect(self) -> None:
        """Create the client (on the event loop: gRPC channels belong to one)."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the client."""

    @abstractmethod
    async def _infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        """One inference call; errors already mapped (InvalidInput, MemberFailed)."""

    @abstractmethod
    async def _check(self) -> str | None:
        """One health check: None when the model is ready, else why not."""

    # -- the Replica protocol ----------------------------------------------------------------

    def ready(self) -> bool:
        return self._healthy and not self._closed

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[Outputs]:
        return self._call(feed, tuple(outputs) if outputs else tuple(self._specs))

    async def _call(self, feed: dict[str, np.ndarray], outputs: tuple[str, ...]) -> Outputs:
        if self._closed or self._watch is None:
            raise MemberFailed(f"{self} is not started or already closed")
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self._infer(feed, outputs)
        except TimeoutError:
            raise MemberFailed(f"{self} did not answer within {self.timeout_s:g} s") from None
        for name in outputs:
            array = result.get(name)
            if array is None:
                raise MemberFailed(f"{self} answered without output {name!r}")
            spec = self._specs.get(name)
            if spec is not None and numpy_to_oip(array.dtype) != spec.datatype:
                raise MemberFailed(
                    f"{self} answered {name!r} as {numpy_to_oip(array.dtype)}, the local model "
                    f"says {spec.datatype}: does the server run the same model?"
                )
        return result

    async def start(self) -> None:
        if self._watch is not None or self._closed:
            return
        self._connect()
        await self._probe()
        if self._closed:  # closed while its first check ran
            await self._disconnect()
            return
        self._watch = asyncio.create_task(self._keep_checking(), name=f"health check {self}")

    async def close(self) -> None:
        self._closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await self._disconnect()

    # -- active health checks ----------------------------------------------------------------

    async def _keep_checking(self) -> None:
        while True:
            await asyncio.sleep(self.health.interval_s)
            await self._probe()

    async def _probe(self) -> None:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.health.timeout_s):
                link = self.link
                problem = await (self._check() if link is None else link.check(self._check))
        except TimeoutError:
            problem = f"no answer within {self.health.timeout_s:g} s"
        except Exception as exc:  # any failure to check is a failed check
            problem = describe(exc)
        if problem is None:
            self.check_round_trip_s = time.perf_counter() - began
        self.record_check(problem)

    def record_check(self, problem: str | None) -> None:
        """Count one health check's outcome (None: passed) and update readiness."""
        first = not self._checked_once
        self._checked_once = True
        self.last_check_error = problem
        if problem is None:
            self._failed_checks = 0
            if not self._healthy:
                log.info("%s is ready", self)
            self._healthy = True
            return
        self._failed_checks += 1
        if first or (self._healthy and self._failed_checks >= self.health.unhealthy_threshold):
            log.warning("%s is not ready: %s", self, problem)
            self._healthy = False


def describe(exc: BaseException) -> str:
    """A short reason for a transport failure (some exceptions have an empty message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
