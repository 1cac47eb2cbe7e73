"""Calls to member replicas in flight: a plain call, and a hedged one (Tail at Scale)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from ensemble.replicas.base import Replica
from ensemble.replicas.member import Member

Outputs = dict[str, np.ndarray]


class Call:
    """One call to a member replica, timed from start to completion; ``future`` is its outcome."""

    __slots__ = ("end", "future", "hedged", "member", "replica", "start", "stats")

    def __init__(
        self,
        member: Member,
        replica: Replica,
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
    ) -> None:
        self._begin(member, replica)
        self.future: asyncio.Future[Outputs] = asyncio.ensure_future(replica.infer(feed, outputs))
        self.stats.started()
        self.future.add_done_callback(self._stamp)

    def _begin(self, member: Member, replica: Replica) -> None:
        self.member = member
        self.replica = replica
        self.stats = member.stats[replica.name]
        self.start = time.perf_counter()
        self.end = 0.0
        self.hedged = False

    def _stamp(self, future: asyncio.Future[Outputs]) -> None:
        self.end = time.perf_counter()
        ok = not future.cancelled() and future.exception() is None
        self.stats.finished(self.end - self.start, ok)

    def latency_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start


class HedgedCall(Call):
    """A call that sends a second copy to another replica once the first runs long.

    The hedge goes out ``delay_s`` after the primary if the primary is still running and
    ``may_hedge()`` grants it (the hedging policy's budget). The first successful attempt wins
    and the other is cancelled. If the primary fails before any hedge went out, the backup is
    asked at once (failover, same budget); a failed attempt with a twin still running waits for it.
    """

    __slots__ = ("_attempts", "_backup", "_feed", "_may_hedge", "_outputs", "_primary", "_timer")

    def __init__(
        self,
        member: Member,
        replica: Replica,
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
        *,
        backup: Replica,
        delay_s: float,
        may_hedge: Callable[[], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._begin(member, replica)
        self._primary = replica
        self._backup = backup
        self._may_hedge = may_hedge
        self._feed = feed
        self._outputs = outputs
        self._attempts: list[asyncio.Future[Outputs]] = []
        self.future = loop.create_future()
        self.future.add_done_callback(self._settled)
        self._launch(replica)
        self._timer = loop.call_later(delay_s, self._hedge)

    @property
    def won_by_hedge(self) -> bool:
        return (
            self.future.done() and not self.future.cancelled() and self.replica is not self._primary
        )

    def _hedge(self) -> None:
        if not self.hedged and not self.future.done() and self._may_hedge():
            self.hedged = True
            self._launch(self._backup)

    def _launch(self, replica: Replica) -> None:
        attempt = asyncio.ensure_future(replica.infer(self._feed, self._outputs))
        stats = self.member.stats[replica.name]
        stats.started()
        began = time.perf_counter()
        self._attempts.append(attempt)

        def done(fut: asyncio.Future[Outputs]) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            stats.finished(time.perf_counter() - began, ok)
            if self.future.done():
                return  # the twin already won, or the request gave up
            if ok:
                self.replica = replica
                self.future.set_result(fut.result())
                return
            if any(not a.done() for a in self._attempts):
                return  # the twin may still answer
            if not self.hedged:
                self._timer.cancel()
                self._hedge()  # fail over now rather than at the hedge delay
                if self.hedged:
                    return
            if fut.cancelled():
                self.future.cancel()
            else:
                exc = fut.exception()
                assert exc is not None
                self.future.set_exception(exc)

        attempt.add_done_callback(done)

    def _settled(self, _: asyncio.Future[Outputs]) -> None:
        self.end = time.perf_counter()
        self._timer.cancel()
        for attempt in self._attempts:
            if not attempt.done():
                attempt.cancel()  # the loser: its queued in-process work is skipped
