"""ResilientCall: hedges after the delay (first answer wins, loser cancelled), retries a failure
on the next replica within the budget, times out attempts, and feeds outlier detection; in virtual
time, so each assertion says exactly when an attempt went out or a call settled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import numpy as np
import pytest

from ensemble.clock import VirtualClock
from ensemble.dataplane.calls import ResilientCall, Stage
from ensemble.errors import DeadlineExceeded, InvalidInput
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.types import ReplicaView, TensorSpec
from policies.base import BreakerState
from policies.hedging import HedgeParams, HedgePolicy
from policies.outlier_detection import CircuitBreaker, CircuitBreakerParams


class FakeReplica:
    def __init__(
        self, name: str, delay_s: float, fail: bool = False, error: type[Exception] = RuntimeError
    ) -> None:
        self.name, self.tier = name, "edge"
        self.delay_s, self.fail, self.error = delay_s, fail, error
        self.calls = 0
        self.cancelled = 0
        self.clock = VirtualClock()  # its member's, once in one (see ``member``)
        self.started: list[float] = []
        """When each call to it went out (virtual seconds)."""

    def ready(self) -> bool:
        return True

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[dict[str, np.ndarray]]:
        self.calls += 1
        self.started.append(self.clock.now())
        return self._run()

    async def _run(self) -> dict[str, np.ndarray]:
        try:
            await self.clock.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise self.error(f"{self.name} failed")
        return {"p": np.array([[1.0, 0.0]], np.float32), "by": np.array([self.name])}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def member(clock: VirtualClock, *replicas: FakeReplica) -> Member:
    schema = ClassifierSchema("p", (0, 1), False)
    spec = (TensorSpec("p", "FP32", (-1, 2)),)
    for replica in replicas:
        replica.clock = clock
    return Member("m", (TensorSpec("x", "FP32", (-1, 2)),), spec, schema, replicas, clock=clock)


def resilient(
    m: Member,
    order: list[FakeReplica],
    delay_s: float | None,
    budget: list[bool],
    *,
    retries: list[bool] | None = None,
    max_attempts: int = 1,
    attempt_timeout_s: float | None = None,
) -> ResilientCall:
    retry_budget = retries if retries is not None else []
    return ResilientCall(
        m,
        order,
        {},
        None,
        hedge_delay_s=delay_s,
        may_hedge=lambda: budget.pop(0) if budget else False,
        may_retry=lambda: retry_budget.pop(0) if retry_budget else False,
        max_attempts=max_attempts,
        attempt_timeout=lambda left: attempt_timeout_s if left > 1 else None,
    )


async def settle(clock: VirtualClock, call: ResilientCall) -> ResilientCall:
    """Run virtual time until the call settles, then let the loser's cancellation land."""
    await clock.run(asyncio.wait([call.future]))
    await clock.advance(0)
    return call


async def run(
    primary: FakeReplica, backup: FakeReplica, delay_s: float, budget: list[bool]
) -> ResilientCall:
    clock = VirtualClock()
    m = member(clock, primary, backup)
    return await settle(clock, resilient(m, [primary, backup], delay_s, budget))


def test_fast_primary_sends_no_hedge() -> None:
    primary, backup = FakeReplica("a", 0.001), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, primary, backup)
        call = await settle(clock, resilient(m, [primary, backup], 0.05, [True]))
        assert clock.next_deadline() is None  # the hedge timer went with the answer
        await clock.advance(1.0)
        return call

    call = asyncio.run(main())
    assert call.future.result()["by"][0] == "a"
    assert call.latency_s() == pytest.approx(0.001)
    assert not call.hedged and backup.calls == 0


def test_slow_primary_is_hedged_exactly_at_the_delay_and_the_hedge_wins() -> None:
    primary, backup = FakeReplica("a", 1.0), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        call = resilient(member(clock, primary, backup), [primary, backup], 0.01, [True])
        await clock.advance(0.0099)
        assert not call.hedged and backup.calls == 0
        await clock.advance(0.0001)
        assert call.hedged and backup.started == [pytest.approx(0.01)]
        return await settle(clock, call)

    call = asyncio.run(main())
    assert call.hedged and call.won_by_hedge and call.replica is backup
    assert call.future.result()["by"][0] == "b"
    assert primary.cancelled == 1  # the loser was cancelled
    assert call.latency_s() == pytest.approx(0.011)  # the hedge delay, then the backup's 1 ms


def test_the_hedge_goes_out_at_the_primarys_p95() -> None:
    primary, backup = FakeReplica("a", 1.0), FakeReplica("b", 0.001)
    latencies = [0.010 + 0.001 * i for i in range(20)]  # p95 of these: 0.029

    async def main() -> tuple[ResilientCall, float]:
        clock = VirtualClock()
        m = member(clock, primary, backup)
        for latency_s in latencies:
            m.observe(primary, m.attempt(primary), latency_s, "success")
        delay_s = HedgePolicy(HedgeParams()).delay_s(m.replica_view(primary))
        assert delay_s is not None and delay_s == pytest.approx(0.029)
        return await settle(clock, resilient(m, [primary, backup], delay_s, [True])), delay_s

    call, delay_s = asyncio.run(main())
    assert primary.started == [0.0] and backup.started == [delay_s]
    assert call.won_by_hedge and call.latency_s() == pytest.approx(delay_s + 0.001)


def test_no_budget_means_no_hedge() -> None:
    primary, backup = FakeReplica("a", 0.05), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 0.01, [False]))
    assert not call.hedged and backup.calls == 0
    assert call.future.result()["by"][0] == "a"
    assert call.latency_s() == pytest.approx(0.05)  # the primary's own time: nothing cut in


def test_failed_primary_fails_over_at_once() -> None:
    primary, backup = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 10.0, [True]))  # long before the hedge delay
    assert call.future.result()["by"][0] == "b" and call.hedged
    assert backup.started == [pytest.approx(0.001)]  # the moment the primary failed
    assert call.latency_s() == pytest.approx(0.002)


def test_both_fail_reports_the_error() -> None:
    primary, backup = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001, fail=True)
    call = asyncio.run(run(primary, backup, 10.0, [True]))
    with pytest.raises(RuntimeError, match="b failed"):
        call.future.result()
    assert call.latency_s() == pytest.approx(0.002)


def test_cancelling_the_call_cancels_every_attempt() -> None:
    primary, backup = FakeReplica("a", 1.0), FakeReplica("b", 1.0)

    async def main() -> None:
        clock = VirtualClock()
        m = member(clock, primary, backup)
        call = resilient(m, [primary, backup], 0.01, [True])
        await clock.advance(0.05)
        assert call.hedged and m.stats["a"].outstanding == 1 and m.stats["b"].outstanding == 1
        call.future.cancel()
        await clock.advance(0)
        assert m.stats["a"].outstanding == 0 and m.stats["b"].outstanding == 0
        assert clock.next_deadline() is None  # neither attempt sleeps on

    asyncio.run(main())
    assert primary.cancelled == 1 and backup.cancelled == 1


def test_a_failure_is_retried_on_the_next_replica_within_the_budget() -> None:
    a, b = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001, fail=True)
    c = FakeReplica("c", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, a, b, c)
        call = resilient(m, [a, b, c], None, [], retries=[True, True], max_attempts=3)
        return await settle(clock, call)

    call = asyncio.run(main())
    assert call.future.result()["by"][0] == "c"
    assert call.retries == 2 and not call.hedged and call.replica is c
    assert (a.calls, b.calls, c.calls) == (1, 1, 1)
    # Each retry goes out the moment the attempt before it failed (no backoff).
    assert a.started == [0.0] and b.started == [pytest.approx(0.001)]
    assert c.started == [pytest.approx(0.002)] and call.latency_s() == pytest.approx(0.003)


def test_an_empty_retry_budget_reports_the_failure() -> None:
    a, b = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, a, b)
        return await settle(clock, resilient(m, [a, b], None, [], retries=[False], max_attempts=2))

    call = asyncio.run(main())
    with pytest.raises(RuntimeError, match="a failed"):
        call.future.result()
    assert b.calls == 0 and call.retries == 0
    assert call.latency_s() == pytest.approx(0.001)  # reported as soon as it failed


def test_input_errors_are_never_retried() -> None:
    a, b = FakeReplica("a", 0.001, fail=True, error=InvalidInput), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, a, b)
        call = resilient(m, [a, b], None, [True], retries=[True], max_attempts=2)
        return await settle(clock, call)

    call = asyncio.run(main())
    with pytest.raises(InvalidInput):
        call.future.result()
    assert b.calls == 0


def test_an_attempt_past_its_timeout_is_retried_elsewhere() -> None:
    hung, fine = FakeReplica("a", 5.0), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, hung, fine)
        call = resilient(
            m, [hung, fine], None, [], retries=[True], max_attempts=2, attempt_timeout_s=0.02
        )
        await clock.advance(0.0199)
        assert fine.calls == 0 and hung.cancelled == 0  # not before its timeout
        return await settle(clock, call)

    call = asyncio.run(main())
    assert call.future.result()["by"][0] == "b" and call.retries == 1
    assert hung.cancelled == 1
    assert fine.started == [pytest.approx(0.02)]  # retried exactly at the attempt timeout
    assert call.latency_s() == pytest.approx(0.021)


def test_the_last_attempt_timing_out_reports_a_deadline_error() -> None:
    hung = FakeReplica("a", 5.0)
    other = FakeReplica("b", 5.0)

    async def main() -> ResilientCall:
        clock = VirtualClock()
        m = member(clock, hung, other)
        return await settle(
            clock,
            resilient(
                m, [hung, other], None, [], retries=[False], max_attempts=2, attempt_timeout_s=0.02
            ),
        )

    call = asyncio.run(main())
    with pytest.raises(DeadlineExceeded, match=r"did not answer within its attempt's 20\.0 ms"):
        call.future.result()
    assert call.latency_s() == pytest.approx(0.02) and other.calls == 0


def test_failures_eject_a_replica_and_routing_skips_it() -> None:
    bad, good = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)

    async def main() -> Member:
        clock = VirtualClock()
        m = member(clock, bad, good)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=2, base_ejection_s=60))
        for _ in range(2):
            call = resilient(m, [bad, good], None, [], retries=[True], max_attempts=2)
            await settle(clock, call)
        views = {v.name: v for v in m.replica_views()}
        assert views["a"].ejected and not views["b"].ejected
        # Ejected for exactly base_ejection_s from the second failure, then routable again.
        ejected_at = bad.started[-1] + 0.001
        await clock.advance(ejected_at + 60 - clock.now() - 0.001)
        assert m.replica_views()[0].ejected
        await clock.advance(0.002)
        assert not m.replica_views()[0].ejected  # half-open: its probe may go
        return m

    m = asyncio.run(main())
    assert m.stats["a"].ejections == 1


def test_cancelled_attempts_do_not_count_against_a_replica() -> None:
    slow, fast = FakeReplica("a", 1.0), FakeReplica("b", 0.001)

    async def main() -> Member:
        clock = VirtualClock()
        m = member(clock, slow, fast)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=1))
        call = resilient(m, [slow, fast], 0.005, [True])
        await settle(clock, call)  # the hedge wins, a is cancelled
        return m

    m = asyncio.run(main())
    assert not any(v.ejected for v in m.replica_views())


def test_a_cancelled_probe_lets_the_next_one_go() -> None:
    slow, fast = FakeReplica("a", 1.0), FakeReplica("b", 0.001)

    async def main() -> Member:
        clock = VirtualClock()
        m = member(clock, slow, fast)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=1))
        # Ejected long ago: the ejection is over and the next call to "a" is its probe.
        m.stats["a"].breaker = BreakerState(times_ejected=1, ejected_until=-1.0)
        call = resilient(m, [slow, fast], 0.005, [True])
        await settle(clock, call)  # the probe loses to the hedge
        return m

    m = asyncio.run(main())
    state = m.stats["a"].breaker
    assert state.probe_sent_at is None  # released: another probe may go
    assert not m.replica_views()[0].ejected


# -- hedging a fan-out: only the critical path ------------------------------------------------


def two_members(b_first_s: float, b_delay_s: float) -> tuple[ResilientCall, ResilientCall]:
    """One stage of two members' calls: a's first replica straggles (1 s) and is due a hedge at
    10 ms; b's first replica answers after ``b_first_s``, its hedge delay ``b_delay_s``; each
    member's second replica answers in 1 ms."""
    a1, a2 = FakeReplica("a/0", 1.0), FakeReplica("a/1", 0.001)
    b1, b2 = FakeReplica("b/0", b_first_s), FakeReplica("b/1", 0.001)

    async def main() -> tuple[ResilientCall, ResilientCall]:
        clock = VirtualClock()
        a, b = member(clock, a1, a2), member(clock, b1, b2)
        call_a = resilient(a, [a1, a2], 0.010, [True])
        call_b = resilient(b, [b1, b2], b_delay_s, [True])
        stage = Stage()
        stage.add([call_a, call_b])
        await clock.run(asyncio.wait([call_a.future, call_b.future]))
        return call_a, call_b

    return asyncio.run(main())


def test_a_due_call_is_hedged_once_it_is_the_one_the_request_waits_for() -> None:
    call_a, call_b = two_members(0.030, 0.040)  # b answers at 30 ms, before its own delay
    assert call_a.hedged and call_a.latency_s() == pytest.approx(0.031)  # hedged at 30 ms
    assert not call_b.hedged


def test_calls_all_slow_together_are_not_hedged_until_one_is_left() -> None:
    """Both slow at once (the machine, not a replica): b is due at 20 ms too, yet no hedge
    goes out while both run; a is hedged when b's first replica answers at 50 ms."""
    call_a, call_b = two_members(0.050, 0.020)
    assert call_a.hedged and call_a.latency_s() == pytest.approx(0.051)
    assert not call_b.hedged


def test_the_hedge_delay_is_the_healthy_replicas_not_the_stragglers() -> None:
    policy = HedgePolicy(HedgeParams(min_delay_ms=1))
    straggler = ReplicaView("a/0", "edge", True, latency_ewma_s=0.02, latency_p95_s=0.100)
    healthy = ReplicaView("a/1", "edge", True, latency_ewma_s=0.001, latency_p95_s=0.003)
    unknown = ReplicaView("a/2", "edge", True)
    assert policy.delay_s(straggler) == pytest.approx(0.100)  # its own: too late to help
    assert policy.delay_s(straggler, [healthy, unknown]) == pytest.approx(0.003)
    assert policy.delay_s(unknown, [unknown]) is None
