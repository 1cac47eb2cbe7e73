"""Admission control: the `bounded` policy's decisions, and the gate's running/waiting/shedding
with real asyncio tasks (tests/integration/test_admission.py drives a real gateway)."""

from __future__ import annotations

import asyncio
import time

import pytest

from ensemble.admission import AdmissionGate
from ensemble.errors import Overloaded
from ensemble.metrics import GatewayMetrics
from policies import registry
from policies.admission import AdmissionPolicy, Bounded, BoundedParams, GateView


def bounded(running: int = 2, waiting: int = 2) -> Bounded:
    return Bounded(BoundedParams(max_running=running, max_waiting=waiting, retry_after_s=2.5))


def test_runs_until_full_then_queues_then_sheds_the_least_important() -> None:
    policy = bounded()
    assert policy.admit(GateView(1, []), 5).action == "run"
    assert policy.admit(GateView(2, []), 5).action == "wait"
    assert policy.admit(GateView(1, [3]), 0).action == "wait"  # never overtakes a waiting one
    full = GateView(2, [1, 4])
    shed = policy.admit(full, 4)  # not more important than the worst waiting: the newcomer goes
    assert shed.action == "shed" and "2 requests running and 2 waiting" in shed.reason
    evict = policy.admit(full, 2)
    assert evict.action == "wait" and evict.evict == 1  # priority 4 makes room
    assert policy.admit(GateView(2, [4, 4]), 0).evict == 1  # the newest among equals


def test_next_to_run_is_most_important_then_oldest() -> None:
    policy = bounded()
    assert policy.next_to_run(GateView(1, [3, 1, 1, 0, 0])) == 3
    assert policy.next_to_run(GateView(2, [0])) is None  # no slot free
    assert policy.next_to_run(GateView(0, [])) is None


def test_registered_with_validated_params() -> None:
    policy = registry.build("admission", "bounded", {"max_running": 3}, AdmissionPolicy)
    assert isinstance(policy, Bounded) and policy.params.max_running == 3
    with pytest.raises(ValueError, match="max_waiting"):
        registry.build("admission", "bounded", {"max_waiting": -1}, AdmissionPolicy)


async def hold(
    gate: AdmissionGate,
    policy: Bounded,
    priority: int,
    release: asyncio.Event,
    log: list[str],
    name: str,
    deadline: float | None = None,
) -> None:
    async with gate.slot(policy, priority, deadline):
        log.append(name)
        await release.wait()


def test_the_gate_runs_waits_and_sheds_in_priority_order() -> None:
    async def main() -> None:
        metrics = GatewayMetrics()
        gate = AdmissionGate(metrics)
        policy = bounded(running=1, waiting=2)
        release = asyncio.Event()
        log: list[str] = []
        first = asyncio.ensure_future(hold(gate, policy, 0, release, log, "first"))
        await asyncio.sleep(0)
        low = asyncio.ensure_future(hold(gate, policy, 5, release, log, "low"))
        mid = asyncio.ensure_future(hold(gate, policy, 3, release, log, "mid"))
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (1, 2) and metrics.admission() == (1, 2)
        urgent = asyncio.ensure_future(hold(gate, policy, 0, release, log, "urgent"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="shed while waiting") as shed:
            await low  # evicted to make room for the urgent one
        assert shed.value.retry_after_s == 2.5 and shed.value.http_status == 429
        with pytest.raises(Overloaded, match="overloaded"):
            await hold(gate, policy, 9, release, log, "late")  # full, least important: shed
        release.set()
        await asyncio.gather(first, mid, urgent)
        assert log == ["first", "urgent", "mid"]
        assert (gate.running, gate.waiting) == (0, 0)
        assert dict(metrics.shed) == {"evicted": 1, "full": 1}

    asyncio.run(main())


def test_a_request_waits_no_longer_than_its_deadline() -> None:
    async def main() -> None:
        metrics = GatewayMetrics()
        gate = AdmissionGate(metrics)
        policy = bounded(running=1, waiting=4)
        release = asyncio.Event()
        log: list[str] = []
        busy = asyncio.ensure_future(hold(gate, policy, 0, release, log, "busy"))
        await asyncio.sleep(0)
        deadline = time.perf_counter() + 0.05
        with pytest.raises(Overloaded, match="until the request's deadline"):
            await hold(gate, policy, 0, release, log, "late", deadline)
        assert gate.waiting == 0 and metrics.shed["deadline"] == 1
        release.set()
        await busy
        assert gate.running == 0

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    async def main() -> None:
        gate = AdmissionGate(GatewayMetrics())
        policy = bounded(running=1, waiting=4)
        release = asyncio.Event()
        log: list[str] = []
        busy = asyncio.ensure_future(hold(gate, policy, 0, release, log, "busy"))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(hold(gate, policy, 0, release, log, "gone"))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()  # the slot is handed to `gone` in the same turn it is cancelled
        await busy
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (0, 0) and log == ["busy"]

    asyncio.run(main())
