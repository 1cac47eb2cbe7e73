"""Time as the gateway reads and waits on it: the system clock, and a virtual one for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """A callback due later; ``cancel`` keeps it from running (harmless once it ran)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, and the ways code on the event loop waits on them."""

    def now(self) -> float:
        """Seconds since an arbitrary origin; only differences and comparisons mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (at most one event-loop turn when not positive)."""
        ...

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the event loop ``delay_s`` from now.

        A timer rather than a task sleeping: hedges and attempt timeouts arm one per call, and a
        task costs several times a timer handle on the request path."""
        ...


class SystemClock:
    """The process's monotonic clock and the running event loop's timers.

    ``now`` reads ``time.perf_counter``: the same clock as ``time.monotonic`` and the event
    loop's on Linux and macOS, and the one deadlines elsewhere in the gateway are taken from.
    """

    now = staticmethod(time.perf_counter)  # read many times per request: no frame of ours

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


SYSTEM_CLOCK: Clock = SystemClock()
"""What every ``clock`` parameter defaults to."""

_SETTLE_TURNS = 32
"""Event-loop turns ``VirtualClock`` lets pass after each timer it fires: enough for what a
timer wakes (a task resuming, futures and done-callbacks resolving in turn) to run until it
next waits on the clock."""


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time that stands still until a test moves it: ``advance``, ``step`` or ``run``.

    Sleeps and timers wait for virtual time to reach their deadline and fire in deadline order
    (equal deadlines in the order they were set), each followed by a few event-loop turns so
    that what it woke runs, and sets its own timers, before the next fires. Nothing waits in
    real time, so a test can assert that a hedge went out exactly at its delay.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _VirtualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # as asyncio does: yield once, let no time pass
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, lambda: _wake(woken))
        try:
            await woken
        finally:
            timer.cancel()

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        if delay_s <= 0:  # already due: the next event-loop turn, as asyncio does
            return asyncio.get_running_loop().call_soon(callback)
        timer = _VirtualTimer(self._now + delay_s, callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def next_deadline(self) -> float | None:
        """When the next timer or sleep is due; None when nothing waits on this clock."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def advance(self, seconds: float) -> None:
        """Move time ``seconds`` ahead, firing everything due on the way, in deadline order."""
        if seconds < 0:
            raise ValueError(f"time only moves forward (asked to advance {seconds} s)")
        await _settle()  # tasks started just now arm their timers before time moves
        await self._fire_until(self._now + seconds)

    async def step(self) -> bool:
        """Jump to the next deadline and fire what is due then; False when nothing waits."""
        await _settle()
        when = self.next_deadline()
        if when is None:
            return False
        await self._fire_until(when)
        return True

    async def run(self, awaitable: Awaitable[T], *, within_s: float = 3600.0) -> T:
        """Await ``awaitable`` while jumping from deadline to deadline: a whole scenario at once.

        RuntimeError when it waits on nothing this clock will fire (in real time it would hang,
        or it waits on the real clock) or is not done ``within_s`` of virtual time."""
        future = asyncio.ensure_future(awaitable)
        limit = self._now + within_s
        await _settle()
        while not future.done():
            when = self.next_deadline()
            if when is None or when > limit:
                waits = "nothing the virtual clock will fire" if when is None else f"until {when}"
                raise RuntimeError(f"not done at virtual time {self._now}: waits {waits}")
            await self._fire_until(when)
        return future.result()

    async def _fire_until(self, until: float) -> None:
        while (when := self.next_deadline()) is not None and when <= until:
            self._now = when
            _, _, timer = heapq.heappop(self._timers)
            timer.callback()
            await _settle()  # what it woke runs, and arms its own timers, before the next fires
        self._now = until


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():  # not cancelled meanwhile
        sleeper.set_result(None)


async def _settle() -> None:
    for _ in range(_SETTLE_TURNS):
        await asyncio.sleep(0)
