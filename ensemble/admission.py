"""The admission gate every inference request passes before any work: run, wait, or be shed.

The policy (``policies/admission.py``, chosen by the config's ``admission``) decides from a
snapshot; the gate holds the running count and the waiting requests and does the waiting. A
request waits at most until its deadline; a shed one gets ``Overloaded`` (429 with
``Retry-After``; gRPC RESOURCE_EXHAUSTED) before the gateway spent anything on it, so under
overload the requests it does take still finish in time (goodput holds) instead of every
request queueing into a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ensemble.errors import Overloaded
from ensemble.metrics import GatewayMetrics
from policies.admission import AdmissionPolicy, GateView


@dataclass(eq=False)
class _Waiter:
    priority: int
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AdmissionGate:
    """Requests running now and waiting for a slot; one per gateway (reloads keep it)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.running = 0
        self._waiting: list[_Waiter] = []
        metrics.admission = lambda: (self.running, len(self._waiting))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _view(self) -> GateView:
        return GateView(self.running, [w.priority for w in self._waiting])

    @contextlib.asynccontextmanager
    async def slot(
        self, policy: AdmissionPolicy, priority: int, deadline: float | None
    ) -> AsyncIterator[None]:
        """Hold a running slot for the ``async with`` body; Overloaded when shed."""
        decision = policy.admit(self._view(), priority)
        if decision.action == "shed":
            self._shed("full")
            raise Overloaded(f"overloaded: {decision.reason}; retry later", policy.retry_after_s)
        if decision.evict is not None:
            victim = self._waiting.pop(decision.evict)
            self._shed("evicted")
            victim.future.set_exception(
                Overloaded(
                    f"overloaded: shed while waiting ({decision.reason}); retry later",
                    policy.retry_after_s,
                )
            )
        if decision.action == "run":
            self.running += 1
        else:
            await self._wait(policy, priority, deadline)
        try:
            yield
        finally:
            self.running -= 1
            self.wake(policy)

    async def _wait(self, policy: AdmissionPolicy, priority: int, deadline: float | None) -> None:
        waiter = _Waiter(priority)
        self._waiting.append(waiter)
        self.wake(policy)  # a slot may be free (a request ahead of it just finished)
        started = time.perf_counter()
        timeout = None if deadline is None else max(0.0, deadline - started)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter.future)
        except TimeoutError:
            if _granted(waiter):
                return  # granted as the deadline struck: it runs
            self._forget(waiter, policy)
            self._shed("deadline")
            waited = (time.perf_counter() - started) * 1e3
            raise Overloaded(
                f"overloaded: waited {waited:.0f} ms for a slot, until the request's deadline; "
                "retry later",
                policy.retry_after_s,
            ) from None
        except asyncio.CancelledError:  # the client went away
            self._forget(waiter, policy)
            raise

    def _forget(self, waiter: _Waiter, policy: AdmissionPolicy) -> None:
        """Drop a waiter that stopped waiting; give back its slot if it had just got one."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif _granted(waiter):
            self.running -= 1
            self.wake(policy)
        if not waiter.future.done():
            waiter.future.cancel()

    def wake(self, policy: AdmissionPolicy) -> None:
        """Start waiting requests while the policy says a slot is free."""
        while True:
            index = policy.next_to_run(self._view())
            if index is None:
                return
            waiter = self._waiting.pop(index)
            if waiter.future.done():
                continue
            self.running += 1
            waiter.future.set_result(None)

    def _shed(self, reason: str) -> None:
        self.metrics.shed[reason] += 1


def _granted(waiter: _Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None
