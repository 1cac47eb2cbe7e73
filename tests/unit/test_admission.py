"""Admission control: the `bounded` policy's decisions, and the gate's running/waiting/shedding
with real asyncio tasks in virtual time (tests/integration/test_admission.py drives a real
gateway)."""

from __future__ import annotations

import asyncio

import pytest

from ensemble.clock import VirtualClock
from ensemble.dataplane.admission import AdmissionGate
from ensemble.errors import Overloaded
from ensemble.metrics import GatewayMetrics
from policies import registry
from policies.admission import Adaptive, Bounded, BoundedParams
from policies.base import AdmissionPolicy, GateView, LatencyWindow, LimitState


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
    policy: AdmissionPolicy,
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
        clock = VirtualClock()
        gate = AdmissionGate(metrics, clock)
        policy = bounded(running=1, waiting=4)
        release = asyncio.Event()
        log: list[str] = []
        busy = asyncio.ensure_future(hold(gate, policy, 0, release, log, "busy"))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(hold(gate, policy, 0, release, log, "late", 0.05))
        await clock.advance(0.0499)
        assert not late.done() and gate.waiting == 1  # still waiting 0.1 ms before its deadline
        await clock.advance(0.0001)
        with pytest.raises(Overloaded, match="waited 50 ms for a slot, until the request's dead"):
            await late
        assert gate.waiting == 0 and metrics.shed["deadline"] == 1
        release.set()
        await busy
        assert gate.running == 0

    asyncio.run(main())


def test_a_waiter_too_close_to_its_deadline_is_shed_when_its_slot_comes() -> None:
    # Requests have been taking ~80 ms; a waiter with 20 ms left when the slot frees would
    # answer late, so it is shed then and the slot goes to the next waiter, which has time.
    async def main() -> None:
        metrics = GatewayMetrics()
        clock = VirtualClock()
        gate = AdmissionGate(metrics, clock)
        policy = bounded(running=1, waiting=4)
        log: list[str] = []
        done = asyncio.Event()
        done.set()
        first = asyncio.ensure_future(hold(gate, policy, 0, done, log, "first"))
        await first
        assert gate.typical_service_s == 0  # no virtual time passed while it ran
        gate.typical_service_s = 0.08  # as if requests had been taking 80 ms
        release = asyncio.Event()
        busy = asyncio.ensure_future(hold(gate, policy, 0, release, log, "busy"))
        await asyncio.sleep(0)
        now = clock.now()
        tight = asyncio.ensure_future(hold(gate, policy, 0, done, log, "tight", now + 0.05))
        roomy = asyncio.ensure_future(hold(gate, policy, 0, done, log, "roomy", now + 5.0))
        await clock.advance(0.03)  # the slot frees with 20 ms left for "tight"
        assert not tight.done() and gate.waiting == 2
        release.set()
        await busy
        with pytest.raises(Overloaded, match="20 ms left before the request's deadline"):
            await tight
        await roomy
        assert log == ["first", "busy", "roomy"]
        assert metrics.shed["deadline"] == 1 and gate.running == 0 and gate.waiting == 0

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


# -- adaptive -------------------------------------------------------------------------------


def adaptive(**params: object) -> Adaptive:
    defaults: dict[str, object] = {
        "initial_limit": 16,
        "min_limit": 2,
        "max_limit": 64,
        "window_requests": 10,
        "retry_after_s": 2.5,
    }
    return registry.build("admission", "adaptive", {**defaults, **params}, AdmissionPolicy)  # type: ignore[no-any-return]


def run_windows(
    policy: Adaptive, state: LimitState, service_s: float, windows: int, t0: float, busy: bool
) -> tuple[LimitState, float, list[float]]:
    """Feed ``windows`` windows of 10 requests taking ``service_s``, 50 ms apart (virtual
    time); ``busy``: the limit was in use (peak running at the limit)."""
    limits = []
    now = t0
    for _ in range(windows):
        now += 0.05
        peak = int(state.limit) if busy else 1
        state = policy.update(state, LatencyWindow([service_s] * 10, peak, now))
        limits.append(state.limit)
    return state, now, limits


def test_adaptive_limit_shrinks_when_latency_inflates_and_grows_back() -> None:
    policy = adaptive()
    state = policy.start(None, 0.0)
    assert state.limit == 16
    state, now, limits = run_windows(policy, state, 0.002, 40, 0.0, busy=True)
    assert limits == sorted(limits) and state.limit > 40  # at the baseline: grows
    assert state.baseline_s == pytest.approx(0.002)
    grown = state.limit
    state, now, limits = run_windows(policy, state, 0.010, 20, now, busy=True)  # 5x slower
    assert limits == sorted(limits, reverse=True) and state.limit < grown / 3
    assert state.baseline_s < 0.003  # the baseline rises slowly (doubles in 10 s)
    shrunk = state.limit
    state, now, limits = run_windows(policy, state, 0.002, 40, now, busy=True)  # recovered
    assert limits == sorted(limits) and state.limit > 2 * shrunk


def test_adaptive_limit_stays_within_its_bounds() -> None:
    policy = adaptive(min_limit=4, max_limit=20, headroom=1)
    state = policy.start(None, 0.0)
    state, now, limits = run_windows(policy, state, 0.002, 100, 0.0, busy=True)
    assert max(limits) == 20
    state, now, limits = run_windows(policy, state, 1.0, 100, now, busy=True)
    assert min(limits) == 4
    big = adaptive(initial_limit=50, max_limit=64).start(None, 0.0)
    assert policy.start(big, 1.0).limit == 20  # a reload's new bounds clamp the old limit


def test_an_unused_limit_does_not_grow() -> None:
    policy = adaptive()
    state = policy.start(None, 0.0)
    state, _, limits = run_windows(policy, state, 0.002, 20, 0.0, busy=False)
    assert limits == [16.0] * 20


def test_adaptive_sheds_like_bounded_at_its_current_limit() -> None:
    policy = adaptive(waiting_per_limit=0.5)
    assert policy.admit(GateView(3, [], limit=4.7), 5).action == "run"
    assert policy.admit(GateView(4, [], limit=4.7), 5).action == "wait"  # floor(4.7) running
    full = GateView(4, [1, 4, 2], limit=4.7)  # ceil(4.7 * 0.5) = 3 may wait
    assert policy.admit(full, 4).action == "shed"
    evict = policy.admit(full, 0)
    assert evict.action == "wait" and evict.evict == 1  # the least important waiting one
    assert policy.next_to_run(GateView(3, [3, 1, 1], limit=4.7)) == 1
    assert policy.next_to_run(GateView(4, [0], limit=4.7)) is None
    assert policy.admit(GateView(1, [], limit=1.2), 0).action == "run"  # min_limit 2 holds


def test_adaptive_params_are_validated() -> None:
    with pytest.raises(ValueError, match="min_limit <= initial_limit <= max_limit"):
        adaptive(initial_limit=100, max_limit=64)
    with pytest.raises(ValueError, match="tolerance"):
        adaptive(tolerance=0.5)
    with pytest.raises(ValueError, match="extra"):
        adaptive(limit=3)


def test_the_gate_feeds_service_times_to_the_adaptive_limit() -> None:
    async def main() -> None:
        clock = VirtualClock()
        metrics = GatewayMetrics()
        gate = AdmissionGate(metrics, clock=clock)
        policy = adaptive(initial_limit=4, headroom=1, window_requests=4, window_ms=60_000)

        async def request(service_s: float) -> None:
            async with gate.slot(policy, 0, None):
                await clock.advance(service_s)

        for _ in range(3):
            await request(0.002)
        state = gate.limit
        assert state is not None and state.limit == 4 and state.recent_s == 0  # no window yet
        assert metrics.admission_limit() == 4
        await request(0.002)
        state = gate.limit
        assert state is not None and state.recent_s == pytest.approx(0.002)
        release = asyncio.Event()
        log: list[str] = []
        held = [
            asyncio.ensure_future(hold(gate, policy, 0, release, log, str(i))) for i in range(6)
        ]
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (4, 2)  # the limit, and ceil(4 * 1.0) waiting
        await clock.advance(0.05)  # all of them 25x slower than the baseline
        release.set()
        await asyncio.gather(*held)
        state = gate.limit
        assert state is not None and state.limit < 4
        assert len(log) == 6 and (gate.running, gate.waiting) == (0, 0)
        bounded_policy = bounded()
        async with gate.slot(bounded_policy, 0, None):
            pass
        assert gate.limit is None and metrics.admission_limit() is None  # a reload to bounded

    asyncio.run(main())


def test_sheds_asks_the_policy_without_changing_the_gate() -> None:
    async def main() -> None:
        clock = VirtualClock()
        gate = AdmissionGate(GatewayMetrics(), clock)
        policy = bounded(running=1, waiting=1)
        assert gate.sheds(policy, 0) is None  # a policy the gate has not started: slot decides
        release = asyncio.Event()
        log: list[str] = []
        tasks = [
            asyncio.ensure_future(hold(gate, policy, priority, release, log, str(priority)))
            for priority in (0, 3)
        ]
        await clock.advance(0)  # both tasks reach the gate
        assert (gate.running, gate.waiting) == (1, 1)
        error = gate.sheds(policy, 3)
        assert error is not None and "1 requests running and 1 waiting" in error.message
        assert error.retry_after_s == 2.5
        assert gate.sheds(policy, 0) is None  # would evict the waiting priority-3 request
        assert (gate.running, gate.waiting) == (1, 1)
        assert dict(gate.metrics.shed) == {}
        release.set()
        await asyncio.gather(*tasks)
        assert gate.sheds(policy, 3) is None

    asyncio.run(main())
