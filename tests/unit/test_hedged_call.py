"""HedgedCall: the second copy goes out after the delay, first answer wins, loser cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import numpy as np
import pytest

from ensemble.calls import HedgedCall
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.types import TensorSpec


class FakeReplica:
    def __init__(self, name: str, delay_s: float, fail: bool = False) -> None:
        self.name, self.tier = name, "edge"
        self.delay_s, self.fail = delay_s, fail
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
            raise RuntimeError(f"{self.name} failed")
        return {"p": np.array([[1.0, 0.0]], np.float32), "by": np.array([self.name])}

    async def close(self) -> None:
        return None


def member(*replicas: FakeReplica) -> Member:
    schema = ClassifierSchema("p", (0, 1), False)
    spec = (TensorSpec("p", "FP32", (-1, 2)),)
    return Member("m", (TensorSpec("x", "FP32", (-1, 2)),), spec, schema, replicas)


async def run(
    primary: FakeReplica, backup: FakeReplica, delay_s: float, budget: list[bool]
) -> HedgedCall:
    m = member(primary, backup)
    call = HedgedCall(
        m,
        primary,
        {},
        None,
        backup=backup,
        delay_s=delay_s,
        may_hedge=lambda: budget.pop(0) if budget else False,
    )
    await asyncio.wait([call.future], timeout=5)
    await asyncio.sleep(0)  # let the loser's cancellation land
    return call


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
        call = HedgedCall(m, primary, {}, None, backup=backup, delay_s=0.01, may_hedge=lambda: True)
        await asyncio.sleep(0.05)
        call.future.cancel()
        await asyncio.sleep(0.01)
        assert m.stats["a"].outstanding == 0 and m.stats["b"].outstanding == 0

    asyncio.run(main())
    assert primary.cancelled == 1 and backup.cancelled == 1
