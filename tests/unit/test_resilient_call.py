"""ResilientCall: hedges after the delay (first answer wins, loser cancelled), retries a failure
on the next replica within the budget, times out attempts, and feeds outlier detection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import numpy as np
import pytest

from ensemble.calls import ResilientCall
from ensemble.errors import DeadlineExceeded, InvalidInput
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.types import TensorSpec
from policies.reliability import BreakerState, CircuitBreaker, CircuitBreakerParams


class FakeReplica:
    def __init__(
        self, name: str, delay_s: float, fail: bool = False, error: type[Exception] = RuntimeError
    ) -> None:
        self.name, self.tier = name, "edge"
        self.delay_s, self.fail, self.error = delay_s, fail, error
        self.calls = 0
        self.cancelled = 0

    def ready(self) -> bool:
        return True

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[dict[str, np.ndarray]]:
        self.calls += 1
        return self._run()

    async def _run(self) -> dict[str, np.ndarray]:
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise self.error(f"{self.name} failed")
        return {"p": np.array([[1.0, 0.0]], np.float32), "by": np.array([self.name])}

    async def close(self) -> None:
        return None


def member(*replicas: FakeReplica) -> Member:
    schema = ClassifierSchema("p", (0, 1), False)
    spec = (TensorSpec("p", "FP32", (-1, 2)),)
    return Member("m", (TensorSpec("x", "FP32", (-1, 2)),), spec, schema, replicas)


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


async def settle(call: ResilientCall) -> ResilientCall:
    await asyncio.wait([call.future], timeout=5)
    await asyncio.sleep(0)  # let the loser's cancellation land
    return call


async def run(
    primary: FakeReplica, backup: FakeReplica, delay_s: float, budget: list[bool]
) -> ResilientCall:
    return await settle(resilient(member(primary, backup), [primary, backup], delay_s, budget))


def test_fast_primary_sends_no_hedge() -> None:
    primary, backup = FakeReplica("a", 0.001), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 0.05, [True]))
    assert call.future.result()["by"][0] == "a"
    assert not call.hedged and backup.calls == 0


def test_slow_primary_is_hedged_and_the_hedge_wins() -> None:
    primary, backup = FakeReplica("a", 1.0), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 0.01, [True]))
    assert call.hedged and call.won_by_hedge and call.replica is backup
    assert call.future.result()["by"][0] == "b"
    assert primary.cancelled == 1  # the loser was cancelled
    assert call.latency_s() < 0.5


def test_no_budget_means_no_hedge() -> None:
    primary, backup = FakeReplica("a", 0.05), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 0.01, [False]))
    assert not call.hedged and backup.calls == 0
    assert call.future.result()["by"][0] == "a"


def test_failed_primary_fails_over_at_once() -> None:
    primary, backup = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)
    call = asyncio.run(run(primary, backup, 10.0, [True]))  # long before the hedge delay
    assert call.future.result()["by"][0] == "b" and call.hedged


def test_both_fail_reports_the_error() -> None:
    primary, backup = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001, fail=True)
    call = asyncio.run(run(primary, backup, 10.0, [True]))
    with pytest.raises(RuntimeError, match="b failed"):
        call.future.result()


def test_cancelling_the_call_cancels_every_attempt() -> None:
    primary, backup = FakeReplica("a", 1.0), FakeReplica("b", 1.0)

    async def main() -> None:
        m = member(primary, backup)
        call = resilient(m, [primary, backup], 0.01, [True])
        await asyncio.sleep(0.05)
        call.future.cancel()
        await asyncio.sleep(0.01)
        assert m.stats["a"].outstanding == 0 and m.stats["b"].outstanding == 0

    asyncio.run(main())
    assert primary.cancelled == 1 and backup.cancelled == 1


def test_a_failure_is_retried_on_the_next_replica_within_the_budget() -> None:
    a, b = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001, fail=True)
    c = FakeReplica("c", 0.001)

    async def main() -> ResilientCall:
        m = member(a, b, c)
        return await settle(resilient(m, [a, b, c], None, [], retries=[True, True], max_attempts=3))

    call = asyncio.run(main())
    assert call.future.result()["by"][0] == "c"
    assert call.retries == 2 and not call.hedged and call.replica is c
    assert (a.calls, b.calls, c.calls) == (1, 1, 1)


def test_an_empty_retry_budget_reports_the_failure() -> None:
    a, b = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        return await settle(
            resilient(member(a, b), [a, b], None, [], retries=[False], max_attempts=2)
        )

    call = asyncio.run(main())
    with pytest.raises(RuntimeError, match="a failed"):
        call.future.result()
    assert b.calls == 0 and call.retries == 0


def test_input_errors_are_never_retried() -> None:
    a, b = FakeReplica("a", 0.001, fail=True, error=InvalidInput), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        return await settle(
            resilient(member(a, b), [a, b], None, [True], retries=[True], max_attempts=2)
        )

    call = asyncio.run(main())
    with pytest.raises(InvalidInput):
        call.future.result()
    assert b.calls == 0


def test_an_attempt_past_its_timeout_is_retried_elsewhere() -> None:
    hung, fine = FakeReplica("a", 5.0), FakeReplica("b", 0.001)

    async def main() -> ResilientCall:
        m = member(hung, fine)
        call = resilient(
            m, [hung, fine], None, [], retries=[True], max_attempts=2, attempt_timeout_s=0.02
        )
        return await settle(call)

    call = asyncio.run(main())
    assert call.future.result()["by"][0] == "b" and call.retries == 1
    assert hung.cancelled == 1
    assert call.latency_s() < 1.0


def test_the_last_attempt_timing_out_reports_a_deadline_error() -> None:
    hung = FakeReplica("a", 5.0)
    other = FakeReplica("b", 5.0)

    async def main() -> ResilientCall:
        m = member(hung, other)
        return await settle(
            resilient(
                m, [hung, other], None, [], retries=[False], max_attempts=2, attempt_timeout_s=0.02
            )
        )

    call = asyncio.run(main())
    with pytest.raises(DeadlineExceeded, match="did not answer within"):
        call.future.result()


def test_failures_eject_a_replica_and_routing_skips_it() -> None:
    bad, good = FakeReplica("a", 0.001, fail=True), FakeReplica("b", 0.001)

    async def main() -> Member:
        m = member(bad, good)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=2, base_ejection_s=60))
        for _ in range(2):
            await settle(resilient(m, [bad, good], None, [], retries=[True], max_attempts=2))
        return m

    m = asyncio.run(main())
    views = {v.name: v for v in m.replica_views()}
    assert views["a"].ejected and not views["b"].ejected
    assert m.stats["a"].ejections == 1


def test_cancelled_attempts_do_not_count_against_a_replica() -> None:
    slow, fast = FakeReplica("a", 1.0), FakeReplica("b", 0.001)

    async def main() -> Member:
        m = member(slow, fast)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=1))
        await settle(resilient(m, [slow, fast], 0.005, [True]))  # the hedge wins, a is cancelled
        return m

    m = asyncio.run(main())
    assert not any(v.ejected for v in m.replica_views())


def test_a_cancelled_probe_lets_the_next_one_go() -> None:
    slow, fast = FakeReplica("a", 1.0), FakeReplica("b", 0.001)

    async def main() -> Member:
        m = member(slow, fast)
        m.outlier = CircuitBreaker(CircuitBreakerParams(consecutive_failures=1))
        # Ejected long ago: the ejection is over and the next call to "a" is its probe.
        m.stats["a"].breaker = BreakerState(times_ejected=1, ejected_until=-1.0)
        await settle(resilient(m, [slow, fast], 0.005, [True]))  # the probe loses to the hedge
        return m

    m = asyncio.run(main())
    state = m.stats["a"].breaker
    assert state.probe_sent_at is None  # released: another probe may go
    assert not m.replica_views()[0].ejected
