"""The control loop: its own task on its own interval, never on the request path.

Every ``interval_s`` it samples each member placement (calls in flight on its tier's replicas,
calls started, recent p95), averages over ``window_s``, asks the repository's autoscaling policy
for targets (``decide(context, state) -> (decision, state)``), and hands them to the provisioner.
Only the ``static`` provisioner exists yet (issue 6): it observes and changes nothing, so a
placement's replica count stays at its minimum and every decision is logged and exported as
metrics (``ensemble_autoscaler_replicas{kind="desired"}``, ``ensemble_autoscaler_decisions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ensemble.metrics import GatewayMetrics
from ensemble.repository import Repository
from policies.autoscaling import AutoscalingPolicy, PlacementLoad, ScalingContext

log = logging.getLogger("ensemble.control")
Key = tuple[str, str]


class ControlLoop:
    """Observes the repository the dispatcher serves (read at every tick: reloads swap it)."""

    def __init__(
        self,
        repository: Callable[[], Repository],
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._clock = clock
        self._policy: AutoscalingPolicy | None = None
        self._state: Any = None
        self._samples: dict[Key, deque[tuple[float, float, int]]] = {}
        """Per placement: (time, calls in flight, calls started so far)."""
        self.replicas: dict[Key, int] = {}
        """Replicas each placement has (the static provisioner keeps the minimum)."""
        self.desired: dict[Key, int] = {}
        self._task: asyncio.Task[None] | None = None
        metrics.autoscaler = lambda: [
            (member, tier, self.replicas[(member, tier)], self.desired.get((member, tier)))
            for member, tier in list(self.replicas)
        ]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="control loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            settings = self._repository().autoscaling
            await asyncio.sleep(settings.interval_s if settings is not None else 1.0)
            try:
                self.tick()
            except Exception:  # a policy bug must not end the loop
                log.exception("control loop tick failed")

    def tick(self) -> None:
        """One observation and decision."""
        repository = self._repository()
        policy, settings = repository.scaling_policy, repository.autoscaling
        if policy is None or settings is None:
            return
        if policy is not self._policy:  # a new config: start from the policy's own state
            self._policy, self._state = policy, policy.initial_state()
        now = self._clock()
        loads = self._observe(repository, now, settings.window_s)
        decision, self._state = policy.decide(ScalingContext(now, loads), self._state)
        for key, target in decision.targets.items():
            if self.desired.get(key) != target:
                direction = "up" if target > self.replicas.get(key, 0) else "down"
                self._metrics.scaling_decisions[(*key, direction)] += 1
                log.info(
                    "autoscaler: %s@%s %d -> %d replicas (%s); static provisioner: not applied",
                    key[0],
                    key[1],
                    self.replicas.get(key, 0),
                    target,
                    decision.reasons.get(key, "no reason given"),
                )
            self.desired[key] = target
        for key in list(self.desired):
            if key not in decision.targets:
                del self.desired[key]

    def _observe(
        self, repository: Repository, now: float, window_s: float
    ) -> tuple[PlacementLoad, ...]:
        loads = []
        for (member_name, tier), (low, high) in repository.bounds.items():
            member = repository.members.get(member_name)
            if member is None:
                continue
            stats = [member.stats[r.name] for r in member.replicas if r.tier == tier]
            inflight = float(sum(s.outstanding for s in stats))
            calls = sum(s.calls for s in stats)
            key = (member_name, tier)
            samples = self._samples.setdefault(key, deque())
            samples.append((now, inflight, calls))
            while samples and now - samples[0][0] > window_s:
                samples.popleft()
            span = now - samples[0][0]
            rate = (calls - samples[0][2]) / span if span > 0 else 0.0
            p95s = [p for p in (s.p95_s for s in stats) if p is not None]
            replicas = self.replicas.setdefault(key, low)
            loads.append(
                PlacementLoad(
                    member_name,
                    tier,
                    replicas,
                    low,
                    high,
                    sum(x for _, x, _ in samples) / len(samples),
                    rate,
                    max(p95s) * 1e3 if p95s else None,
                )
            )
        return tuple(loads)
