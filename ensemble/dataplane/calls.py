"""Calls to member replicas in flight: a plain call, and a resilient one that can hedge (The
Tail at Scale), retry on another replica or tier within a budget, and time out each attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from ensemble import tracing
from ensemble.clock import Timer
from ensemble.errors import DeadlineExceeded, InvalidInput
from ensemble.replicas.base import Replica, innermost
from ensemble.replicas.links import link_of
from ensemble.replicas.member import Member

Outputs = dict[str, np.ndarray]


class Call:
    """One call to a member replica, timed from start to completion; ``future`` is its outcome.

    Calls tell time by their member's clock, as its stats and outlier detection do."""

    __slots__ = (
        "cost",
        "due",
        "end",
        "future",
        "hedged",
        "member",
        "replica",
        "retries",
        "start",
        "stats",
    )

    def __init__(
        self,
        member: Member,
        replica: Replica,
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
    ) -> None:
        self._begin(member, replica)
        self.future: asyncio.Future[Outputs] = asyncio.ensure_future(
            _sent(member, replica, feed, outputs, 1, "first")
        )
        self.stats = member.attempt(replica)
        self.cost = member.tier_costs.get(replica.tier, 0.0)
        self.future.add_done_callback(self._stamp)

    def _begin(self, member: Member, replica: Replica) -> None:
        self.member = member
        self.replica = replica
        self.start = member.clock.now()
        self.end = 0.0
        self.hedged = False
        self.retries = 0
        self.due = False
        """Past its hedge delay with no hedge sent yet (a plain call never is)."""

    def hedge_now(self) -> None:
        """Send the hedge it is due (a plain call has no other replica to send one to)."""

    def _stamp(self, future: asyncio.Future[Outputs]) -> None:
        self.end = self.member.clock.now()
        outcome = (
            "cancelled" if future.cancelled() else "error" if future.exception() else "success"
        )
        self.member.observe(self.replica, self.stats, self.end - self.start, outcome)

    @property
    def won_by_hedge(self) -> bool:
        return False

    def latency_s(self) -> float:
        return (self.end or self.member.clock.now()) - self.start


class ResilientCall(Call):
    """A member call over an ordered list of replicas (the routing policy's preference).

    The first attempt goes to ``order[0]``. A **hedge** goes to the next replica ``hedge_delay_s``
    later if the first is still running and ``may_hedge()`` grants it (in a ``Stage``, once
    it is the last call the request waits for: only the critical path is hedged);
    the first successful
    attempt wins and the others are cancelled. A **failed** attempt (an error, or running past
    its own timeout) with no twin still running is **retried** on the next untried replica while
    ``max_attempts`` and ``may_retry()`` (the retry budget) allow; with retries spent, a hedge
    not yet sent may still fail over. Errors caused by the input itself are never retried.
    ``attempt_timeout(attempts_left)`` gives each attempt's timeout (None: none).
    """

    __slots__ = (
        "_attempt_timeout",
        "_attempts",
        "_feed",
        "_max_attempts",
        "_may_hedge",
        "_may_retry",
        "_order",
        "_outputs",
        "_primary",
        "_stage",
        "_timer",
        "_tried",
    )

    def __init__(
        self,
        member: Member,
        order: Sequence[Replica],
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
        *,
        hedge_delay_s: float | None,
        may_hedge: Callable[[], bool],
        may_retry: Callable[[], bool],
        max_attempts: int,
        attempt_timeout: Callable[[int], float | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._begin(member, order[0])
        self.cost = 0.0
        self._primary = order[0]
        self._order = order
        self._tried = 0
        self._may_hedge = may_hedge
        self._may_retry = may_retry
        self._max_attempts = max_attempts
        self._attempt_timeout = attempt_timeout
        self._feed = feed
        self._outputs = outputs
        self._attempts: list[asyncio.Future[Outputs]] = []
        self._stage: Stage | None = None
        self.future = loop.create_future()
        self.future.add_done_callback(self._settled)
        self._launch()
        self._timer = (
            member.clock.call_later(hedge_delay_s, self._hedge_delay_passed)
            if hedge_delay_s is not None
            else None
        )

    @property
    def won_by_hedge(self) -> bool:
        return (
            self.hedged
            and self.future.done()
            and not self.future.cancelled()
            and self.replica is not self._primary
        )

    def _hedge_delay_passed(self) -> None:
        if self._stage is None:
            self.hedge_now()
        elif not self.hedged and not self.future.done():
            self.due = True
            self._stage.check()

    def hedge_now(self) -> None:
        """Send the hedge now if the call still runs, has a replica left and the budget
        grants one."""
        self.due = False
        if (
            not self.hedged
            and not self.future.done()
            and self._tried < len(self._order)
            and self._may_hedge()
        ):
            self.hedged = True
            self._launch("hedge")

    def _launch(self, kind: str = "first") -> None:
        replica = self._order[self._tried]
        self._tried += 1
        left = min(self._max_attempts - self.retries, len(self._order) - self._tried + 1)
        timeout = self._attempt_timeout(left)
        attempt = asyncio.ensure_future(
            _sent(self.member, replica, self._feed, self._outputs, self._tried, kind)
        )
        stats = self.member.attempt(replica)
        self.cost += self.member.tier_costs.get(replica.tier, 0.0)
        clock = self.member.clock
        began = clock.now()
        self._attempts.append(attempt)
        expired = False
        timer: Timer | None = None
        if timeout is not None:

            def expire() -> None:
                nonlocal expired
                expired = True
                attempt.cancel()

            timer = clock.call_later(timeout, expire)

        def done(fut: asyncio.Future[Outputs]) -> None:
            if timer is not None:
                timer.cancel()
            error: BaseException | None = None
            if expired:
                error = DeadlineExceeded(
                    f"replica {replica.name!r} did not answer within its attempt's "
                    f"{timeout * 1000.0 if timeout else 0.0:.1f} ms"
                )
            elif not fut.cancelled():
                error = fut.exception()
            outcome = "error" if error else "cancelled" if fut.cancelled() else "success"
            self.member.observe(replica, stats, clock.now() - began, outcome)
            if self.future.done():
                return  # the twin already won, or the request gave up
            if outcome == "success":
                self.replica = replica
                self.future.set_result(fut.result())
                return
            if any(not a.done() for a in self._attempts):
                return  # the twin may still answer
            self.replica = replica  # the last one tried, until another answers
            if self._retry(error):
                return
            if error is None:
                self.future.cancel()
            else:
                self.future.set_exception(error)

        attempt.add_done_callback(done)

    def _retry(self, error: BaseException | None) -> bool:
        """Send another attempt after a failure if anything allows it; whether one went out."""
        if error is None or isinstance(error, InvalidInput) or self._tried >= len(self._order):
            return False
        if 1 + self.retries < self._max_attempts and self._may_retry():
            self.retries += 1
            self._launch("retry")
            return True
        if not self.hedged:  # fail over now rather than at the hedge delay
            self.hedge_now()
            return self.hedged
        return False

    def _settled(self, _: asyncio.Future[Outputs]) -> None:
        self.end = self.member.clock.now()
        if self._timer is not None:
            self._timer.cancel()
        for attempt in self._attempts:
            if not attempt.done():
                attempt.cancel()  # the loser: its queued in-process work is skipped


def _sent(
    member: Member,
    replica: Replica,
    feed: dict[str, np.ndarray],
    outputs: tuple[str, ...] | None,
    number: int,
    kind: str,
) -> Awaitable[Outputs]:
    """One attempt of a member call (``kind``: first, hedge or retry), traced when tracing
    is on."""
    call = replica.infer(feed, outputs)
    if not tracing.enabled():
        return call
    attributes: dict[str, str | bool | int | float] = {
        "ensemble.member": member.name,
        "ensemble.member.version": member.version,
        "ensemble.tier": replica.tier,
        "ensemble.replica": replica.name,
        "ensemble.attempt": number,
        "ensemble.attempt.kind": kind,
    }
    link = link_of(replica)
    if link is not None:
        attributes["ensemble.link.delay_seconds"] = link.settings.delay_ms / 1000
        attributes["ensemble.link.partitioned"] = link.settings.partitioned
    endpoint = getattr(innermost(replica), "endpoint", None)
    remote = isinstance(endpoint, str)  # a replica with an endpoint is another process's
    if remote:
        attributes.update(tracing.peer_attributes(str(endpoint)))
    return tracing.attempt(call, f"call {member.name}", attributes, remote=remote)


class Stage:
    """The calls one request waits for together (one selection stage). A call due a hedge
    gets it only once it is the last one running: hedging a member that others are slower
    than would not bring the answer sooner, and when every call is slow the machine or the
    network is, which a second copy makes worse (Tail at Scale's hedges, for the critical
    path of a fan-out). A call on its own hedges at its delay."""

    __slots__ = ("calls", "hedging", "watched")

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.hedging = False
        """Some call may hedge (a ResilientCall): only then are landings watched (a plain
        call is never due a hedge)."""
        self.watched = 0
        """``calls[:watched]`` have their landing watched."""

    def add(self, calls: list[Call]) -> None:
        for call in calls:
            self.calls.append(call)
            if isinstance(call, ResilientCall):
                call._stage = self
                self.hedging = True
        if self.hedging:
            for call in self.calls[self.watched :]:
                call.future.add_done_callback(self._landed)
            self.watched = len(self.calls)

    def _landed(self, _: object) -> None:
        self.check()

    def check(self) -> None:
        """Hedge the call still running if it is the only one and due a hedge."""
        running = [c for c in self.calls if not c.future.done()]
        if len(running) == 1 and running[0].due:
            running[0].hedge_now()
