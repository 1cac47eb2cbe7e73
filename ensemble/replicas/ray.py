"""A member's replica that is a Ray Serve deployment, called through its handle.

The gateway sees one replica per deployment; Ray Serve balances the deployment's own replicas.
The deployments themselves are made by `ensemble.control.ray_runtime`; this module only calls
them (Ray is never imported here: the handle does the work).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.errors import EnsembleError, InvalidInput, MemberFailed
from ensemble.replicas.remote import HealthCheck, Outputs, RemoteReplica, describe
from ensemble.scope import outgoing
from ensemble.types import TensorSpec

log = logging.getLogger("ensemble.ray")


@dataclass(eq=False)
class _Waiting:
    """A call waiting for (or riding in) a Ray request."""

    feed: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    future: asyncio.Future[Outputs]
    deadline: float | None = None
    """When its request gives up, in ``time.monotonic`` seconds; None: no deadline."""


class RayReplica(RemoteReplica):
    """A Ray Serve deployment as one replica of a member (Ray balances its own replicas).

    A Ray Serve call costs milliseconds of CPU on each side whatever it carries (about 5 ms in
    the gateway and 4-5 ms in the Serve replica per call here, for a model that runs in 0.4
    ms), so calls are **coalesced**: at most ``max_inflight`` Ray requests are in flight per
    deployment, and calls arriving meanwhile wait and go together as one request (their rows
    concatenated, the answer split back), up to ``max_batch_rows`` rows. An idle gateway sends
    each call at once; a busy one pays Ray's overhead once per batch, not once per call
    (Clipper's adaptive batching, without a timer). A batch the model rejects is retried call
    by call, so one bad input fails only its own request. A cancelled call (a hedge's loser, a
    request past its deadline) leaves its batch; the Ray request is cancelled once nobody waits
    for it. Health checks call the deployment's ``ready`` method through the same handle.
    """

    backend = "ray"

    def __init__(
        self,
        name: str,
        tier: str,
        handle: Any,
        app: str,
        deployment: str,
        model: str,
        outputs: Sequence[TensorSpec],
        *,
        timeout_s: float,
        health: HealthCheck,
        batchable: bool = True,
        max_inflight: int = 1,
        replicas: int = 1,
        max_batch_rows: int = 256,
    ) -> None:
        super().__init__(
            name,
            tier,
            f"ray://{app}/{deployment}",
            model,
            outputs,
            timeout_s=timeout_s,
            health=health,
        )
        self._handle = handle
        self.app, self.deployment = app, deployment
        self.batchable = batchable
        """Every input and output has a variable first dimension, so calls can be stacked."""
        self.inflight_per_replica = max_inflight
        """Ray requests in flight per Serve replica (``max_inflight_requests``)."""
        self.replicas = replicas
        """Serve replicas of its deployment as last set; 0: scaled to zero (not routed to,
        not health-checked, so nothing wakes it but the control loop)."""
        self.max_batch_rows = max_batch_rows
        self._queue: list[_Waiting] = []
        self._inflight = 0
        self._pumping = False
        self._flights: set[asyncio.Task[None]] = set()
        self.requests_sent = 0
        """Ray requests made for calls (health checks not counted): fewer than calls under load."""

    @property
    def max_inflight(self) -> int:
        return self.inflight_per_replica * max(1, self.replicas)

    def scaled_to(self, replicas: int) -> None:
        """Its deployment now runs ``replicas`` Serve replicas (or is on its way to)."""
        self.replicas = replicas
        if replicas == 0 and self._healthy:  # unready at once, whatever the check threshold
            log.info("%s is scaled to zero", self)
            self._healthy = False
            self.last_check_error = "scaled to zero"

    def _connect(self) -> None:
        pass  # the handle exists already

    async def _disconnect(self) -> None:
        _fail(self._queue, MemberFailed(f"{self} is closed"))
        self._queue = []
        for flight in list(self._flights):
            flight.cancel()

    async def _infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        loop = asyncio.get_running_loop()
        rows = len(next(iter(feed.values()))) if feed else 0
        timeout_us, _ = outgoing(self.timeout_s)
        deadline = None if timeout_us is None else time.monotonic() + timeout_us / 1e6
        waiting = _Waiting(feed, tuple(outputs), rows, loop.create_future(), deadline)
        self._queue.append(waiting)
        if not self._pumping:
            # After the current tick, so calls made together leave together.
            self._pumping = True
            loop.call_soon(self._pump)
        return await waiting.future

    def _pump(self) -> None:
        self._pumping = False
        self._queue = [w for w in self._queue if not w.future.done()]
        while self._queue and self._inflight < self.max_inflight:
            batch = self._next_batch()
            self._inflight += 1
            flight = asyncio.ensure_future(self._fly(batch))
            self._flights.add(flight)
            flight.add_done_callback(self._landed)

    def _next_batch(self) -> list[_Waiting]:
        """The oldest call and the queued calls that can share its request."""
        first = self._queue.pop(0)
        batch, rows, rest = [first], first.rows, []
        key = _stack_key(first)
        for waiting in self._queue:
            fits = rows + waiting.rows <= self.max_batch_rows
            if self.batchable and fits and _stack_key(waiting) == key:
                batch.append(waiting)
                rows += waiting.rows
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    def _landed(self, flight: asyncio.Task[None]) -> None:
        self._flights.discard(flight)
        self._inflight -= 1
        if self._queue and not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    async def _fly(self, batch: list[_Waiting]) -> None:
        feed = batch[0].feed
        if len(batch) > 1:
            feed = {name: np.concatenate([w.feed[name] for w in batch]) for name in feed}
        try:
            result = await self._request(feed, batch[0].outputs, batch)
        except asyncio.CancelledError:  # the replica is closing
            _fail(batch, MemberFailed(f"{self} is closed"))
            raise
        except InvalidInput as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # Whose input was it? Each call on its own finds out.
            await asyncio.gather(*(self._fly([w]) for w in batch if not w.future.done()))
            return
        except EnsembleError as exc:
            _fail(batch, exc)
            return
        offset = 0
        for waiting in batch:
            if not waiting.future.done():
                part = {k: v[offset : offset + waiting.rows] for k, v in result.items()}
                waiting.future.set_result(part if len(batch) > 1 else result)
            offset += waiting.rows

    async def _request(
        self, feed: dict[str, np.ndarray], outputs: tuple[str, ...], batch: list[_Waiting]
    ) -> Outputs:
        """One Ray request; cancelled once every call in ``batch`` has stopped waiting."""
        self.requests_sent += 1
        # The request carries the time left to the latest deadline of the calls riding in
        # it: work past it is for nobody, and the Serve replica skips it (it is cancelled,
        # too, once every call has given up). Time left, not a deadline: the replica may be
        # on a node whose clock is not this one's.
        deadlines = [w.deadline for w in batch]
        left = None
        if None not in deadlines:
            left = max(0.0, max(d for d in deadlines if d is not None) - time.monotonic())
        response = self._handle.remote(feed, list(outputs), time_left_s=left)

        def abandon(_: object) -> None:
            if all(w.future.done() for w in batch):
                response.cancel()

        for waiting in batch:
            waiting.future.add_done_callback(abandon)
        try:
            result: Outputs = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise self._mapped(exc) from exc
        return result

    def _mapped(self, exc: Exception) -> EnsembleError:
        cause = getattr(exc, "cause", None)  # RayTaskError carries the replica's exception
        if isinstance(cause, InvalidInput):
            return InvalidInput(f"{self} rejected the input: {cause.message}")
        if isinstance(cause, EnsembleError):
            return MemberFailed(f"{self} failed: {cause.message}")
        return MemberFailed(f"{self}: {describe(cause or exc)}")

    async def _check(self) -> str | None:
        if self.replicas == 0:
            return "scaled to zero"
        response = self._handle.ready.remote()
        try:
            await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            return describe(exc)
        return None


def _stack_key(waiting: _Waiting) -> tuple[object, ...]:
    """Calls can share one request with the same outputs and the same non-batch shapes."""
    return (waiting.outputs, tuple((k, v.shape[1:], v.dtype.str) for k, v in waiting.feed.items()))


def _fail(batch: list[_Waiting], exc: BaseException) -> None:
    for waiting in batch:
        if not waiting.future.done():
            waiting.future.set_exception(exc)
