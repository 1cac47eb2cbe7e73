"""Emulated replica faults and devices for tests and demos: replicas that answer some calls late
or fail, replicas with a device's service time and concurrency, and slower devices."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.errors import MemberFailed
from ensemble.replicas.base import Replica, innermost
from ensemble.replicas.inprocess import InProcessReplica


class _FaultyReplica:
    """Wraps a replica; a seeded ``probability`` share of its calls go through ``_hit``."""

    def __init__(self, inner: Replica, probability: float, seed: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.tier = inner.tier
        self.probability = probability
        self._rng = random.Random(seed)

    def ready(self) -> bool:
        return self.inner.ready()

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[dict[str, np.ndarray]]:
        if self._rng.random() >= self.probability:
            return self.inner.infer(feed, outputs)
        return self._hit(feed, outputs)

    async def _hit(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()


class StragglerReplica(_FaultyReplica):
    """Wraps a replica so that a share of its calls answer ``delay_s`` late (tail latency)."""

    def __init__(
        self,
        inner: Replica,
        probability: float,
        delay_s: float,
        seed: int,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(inner, probability, seed)
        self.delay_s = delay_s
        self._clock = clock

    async def _hit(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        result = await self.inner.infer(feed, outputs)
        await self._clock.sleep(self.delay_s)
        return result


class FailingReplica(_FaultyReplica):
    """Wraps a replica so that a share of its calls fail (probability 1: a dead replica)."""

    async def _hit(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        raise MemberFailed(f"replica {self.name} failed (emulated fault)")


class DeviceReplica(_FaultyReplica):
    """Wraps a replica as a slower device: at most ``concurrency`` calls at once, each holding
    its slot for at least ``service_s`` (calls beyond wait in FIFO order)."""

    def __init__(
        self, inner: Replica, service_s: float, concurrency: int, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        super().__init__(inner, 1.0, 0)
        self.service_s = service_s
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)

    async def _hit(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        async with self._slots:
            started = self._clock.now()
            result = await self.inner.infer(feed, outputs)
            await self._clock.sleep(self.service_s - (self._clock.now() - started))
            return result


class SlowReplica(_FaultyReplica):
    """Wraps a replica as a slower device (a tier's ``compute_slowdown``): each call takes
    ``factor`` times its compute. For an in-process replica the compute is its session's cost
    for the call's rows as known when it was wrapped (its card's or its timed runs: warm
    figures, so the emulated device's speed does not drift with the host's caches); for
    others the call's whole duration."""

    def __init__(self, inner: Replica, factor: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(inner, 1.0, 0)
        self.factor = factor
        self._clock = clock
        found = innermost(inner)
        runner = found.runner if isinstance(found, InProcessReplica) else None
        self._cost = None if runner is None else (runner.fixed_s, runner.per_row_s)

    def extra_s(self, rows: int) -> float | None:
        """What the emulation adds to a call of ``rows`` rows (None: known only afterwards)."""
        if self._cost is None:
            return None
        fixed_s, per_row_s = self._cost
        return (self.factor - 1.0) * (fixed_s + per_row_s * rows)

    async def _hit(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        started = self._clock.now()
        result = await self.inner.infer(feed, outputs)
        rows = next(iter(feed.values())).shape[0] if feed else 1
        extra = self.extra_s(rows)
        if extra is None:
            extra = (self.factor - 1.0) * (self._clock.now() - started)
        await self._clock.sleep(extra)
        return result
