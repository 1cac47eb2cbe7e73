"""The admission gate every inference request passes before any work: run, wait, or be shed.

The policy (``policies/admission.py``, chosen by the config's ``admission``) decides from a
snapshot; the gate holds the running count and the waiting requests and does the waiting. A
request waits at most until its deadline; a shed one gets ``Overloaded`` (429 with
``Retry-After``; gRPC RESOURCE_EXHAUSTED) before the gateway spent anything on it, so under
overload the requests it does take still finish in time (goodput holds) instead of every
request queueing into a timeout. For an adaptive policy the gate also keeps the policy's
``LimitState`` and feeds it the service times of finished requests, a window at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.cluster.slots import LocalSlots, Slots
from ensemble.errors import Overloaded
from ensemble.metrics import GatewayMetrics
from policies.base import AdaptiveLimit, AdmissionPolicy, GateView, LatencyWindow, LimitState


@dataclass(eq=False)
class _Waiter:
    priority: int
    deadline: float | None
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


_EWMA = 0.1
"""Weight of each finished request in ``typical_service_s``."""

POLL_S = 0.001
"""With the count shared by workers, how often a worker with requests waiting looks for a slot
another worker freed (its own finished requests wake them at once)."""


class AdmissionGate:
    """Requests running now and waiting for a slot; one per gateway (reloads keep it, and an
    adaptive limit carries over to the next adaptive policy). With ``slots`` shared by the
    gateway's workers the running count, and so the policy's limit, is the whole gateway's;
    the waiting requests, and so ``max_waiting``, are each worker's."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        clock: Clock = SYSTEM_CLOCK,
        slots: Slots | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.slots = slots if slots is not None else LocalSlots()
        self._polling = False
        self._waiting: list[_Waiter] = []
        self._policy: AdmissionPolicy | None = None
        self._adaptive: AdaptiveLimit | None = None
        self._limit: LimitState | None = None
        self._service_s: list[float] = []
        self._peak = 0
        self.typical_service_s = 0.0
        """Moving average of how long admitted requests hold their slot (0: none finished)."""
        metrics.admission = lambda: (self.slots.mine, len(self._waiting))
        metrics.admission_limit = lambda: None if self._limit is None else self._limit.limit

    @property
    def running(self) -> int:
        """Requests running now (in every worker, when the count is shared)."""
        return self.slots.total()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def limit(self) -> LimitState | None:
        """The adaptive policy's state now (None unless the policy is adaptive)."""
        return self._limit

    def _view(self) -> GateView:
        limit = None if self._limit is None else self._limit.limit
        return GateView(self.running, [w.priority for w in self._waiting], limit)

    def _switch(self, policy: AdmissionPolicy) -> None:
        """A new policy (first request, or a reload): start its limit state, if it keeps one."""
        self._policy = policy
        # isinstance on a Protocol is slow; it runs once per policy, not per request.
        self._adaptive = policy if isinstance(policy, AdaptiveLimit) else None
        self._service_s.clear()
        self._peak = self.running
        if self._adaptive is None:
            self._limit = None
        else:
            self._limit = self._adaptive.start(self._limit, self.clock.now())

    def slot(self, policy: AdmissionPolicy, priority: int, deadline: float | None) -> Slot:
        """A running slot held for an ``async with`` body; entering raises Overloaded when the
        request is shed."""
        return Slot(self, policy, priority, deadline)

    async def _enter(self, policy: AdmissionPolicy, priority: int, deadline: float | None) -> None:
        if policy is not self._policy:
            self._switch(policy)
        decision = policy.admit(self._view(), priority)
        if decision.action == "shed":
            self.count_shed("full")
            raise _full(policy, decision.reason)
        if decision.evict is not None:
            victim = self._waiting.pop(decision.evict)
            self.count_shed("evicted")
            victim.future.set_exception(
                Overloaded(
                    f"overloaded: shed while waiting ({decision.reason}); retry later",
                    policy.retry_after_s,
                )
            )
        if decision.action == "run":
            self._start()
        else:
            await self._wait(policy, priority, deadline)

    def _leave(self, policy: AdmissionPolicy, service_s: float | None) -> None:
        """A slot given back; ``service_s``: how long it was held (None: the client went away,
        and its time says nothing about service)."""
        self.slots.add(-1)
        if service_s is not None:
            typical = self.typical_service_s
            self.typical_service_s = (
                service_s if typical == 0 else typical + _EWMA * (service_s - typical)
            )
            if self._adaptive is not None and policy is self._policy:
                self._record(self._adaptive, service_s)
        self.wake(policy)

    def sheds(self, policy: AdmissionPolicy, priority: int) -> Overloaded | None:
        """The error a request of ``priority`` arriving now would be shed with, or None when it
        would run or wait. Changes nothing (not even the count): a frontend asks before it
        decodes a request, so shedding under overload costs little more than the HTTP
        exchange (``slot`` decides for real)."""
        if policy is not self._policy:
            return None  # a new policy (a reload) starts its state in ``slot``
        decision = policy.admit(self._view(), priority)
        return _full(policy, decision.reason) if decision.action == "shed" else None

    def count_shed(self, reason: str) -> None:
        """One more request shed for ``reason`` (full, evicted, deadline)."""
        self.metrics.shed[reason] += 1

    def _start(self) -> None:
        self.slots.add(1)
        running = self.slots.total()
        if running > self._peak:
            self._peak = running

    def _record(self, adaptive: AdaptiveLimit, service_s: float) -> None:
        """Keep one service time; every window (so many requests, or so long) update the limit."""
        self._service_s.append(service_s)
        state = self._limit
        assert state is not None
        now = self.clock.now()
        if len(self._service_s) < adaptive.window_requests and now - state.updated_s < (
            adaptive.window_s
        ):
            return
        window = LatencyWindow(tuple(self._service_s), self._peak, now)
        self._service_s.clear()
        self._peak = self.running
        self._limit = adaptive.update(state, window)

    async def _wait(self, policy: AdmissionPolicy, priority: int, deadline: float | None) -> None:
        waiter = _Waiter(priority, deadline)
        self._waiting.append(waiter)
        self.wake(policy)  # a slot may be free (a request ahead of it just finished)
        if self.slots.shared and not self._polling and self._waiting:
            self._polling = True
            self.clock.call_later(POLL_S, lambda: self._poll(policy))
        started = self.clock.now()
        expiry = None
        if deadline is not None and not waiter.future.done():
            # Whichever settles the waiter first wins: a slot, an eviction, or its deadline.
            expiry = self.clock.call_later(max(0.0, deadline - started), lambda: _expire(waiter))
        try:
            await asyncio.shield(waiter.future)
        except TimeoutError:
            self._forget(waiter, policy)
            self.count_shed("deadline")
            waited = (self.clock.now() - started) * 1e3
            raise Overloaded(
                f"overloaded: waited {waited:.0f} ms for a slot, until the request's deadline; "
                "retry later",
                policy.retry_after_s,
            ) from None
        except asyncio.CancelledError:  # the client went away
            self._forget(waiter, policy)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    def _forget(self, waiter: _Waiter, policy: AdmissionPolicy) -> None:
        """Drop a waiter that stopped waiting; give back its slot if it had just got one."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif _granted(waiter):
            self.slots.add(-1)
            self.wake(policy)
        if not waiter.future.done():
            waiter.future.cancel()

    def _poll(self, policy: AdmissionPolicy) -> None:
        """Look for a slot another worker freed, while requests wait here."""
        self.wake(policy)
        if self._waiting:
            self.clock.call_later(POLL_S, lambda: self._poll(policy))
        else:
            self._polling = False

    def wake(self, policy: AdmissionPolicy) -> None:
        """Start waiting requests while the policy says a slot is free (the newest policy, if a
        reload brought one since ``policy``). A waiter whose deadline is nearer than a typical
        service time is shed instead: it would most likely answer late (504), and the work
        spent on it is work the requests behind it need to finish in time."""
        current = self._policy or policy
        while self._waiting:
            index = current.next_to_run(self._view())
            if index is None:
                return
            waiter = self._waiting.pop(index)
            if waiter.future.done():
                continue
            if waiter.deadline is not None:
                left_s = waiter.deadline - self.clock.now()
                if left_s < self.typical_service_s:
                    self.count_shed("deadline")
                    waiter.future.set_exception(
                        Overloaded(
                            f"overloaded: {max(0.0, left_s) * 1e3:.0f} ms left before the "
                            f"request's deadline when a slot came free, and requests take about "
                            f"{self.typical_service_s * 1e3:.0f} ms now; retry later",
                            current.retry_after_s,
                        )
                    )
                    continue
            self._start()
            waiter.future.set_result(None)


class Slot:
    """One request's hold on a running slot (an ``async with`` body): a class, not a generator
    context manager, which cost a request several microseconds."""

    __slots__ = ("_deadline", "_gate", "_policy", "_priority", "_started")

    def __init__(
        self, gate: AdmissionGate, policy: AdmissionPolicy, priority: int, deadline: float | None
    ) -> None:
        self._gate = gate
        self._policy = policy
        self._priority = priority
        self._deadline = deadline
        self._started = 0.0

    async def __aenter__(self) -> None:
        await self._gate._enter(self._policy, self._priority, self._deadline)
        self._started = self._gate.clock.now()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gate = self._gate
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        gate._leave(self._policy, None if cancelled else gate.clock.now() - self._started)


def _full(policy: AdmissionPolicy, reason: str) -> Overloaded:
    """A newcomer shed because the gate is full."""
    return Overloaded(f"overloaded: {reason}; retry later", policy.retry_after_s)


def _expire(waiter: _Waiter) -> None:
    """The waiter's deadline came before a slot did."""
    if not waiter.future.done():
        waiter.future.set_exception(TimeoutError())


def _granted(waiter: _Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None
