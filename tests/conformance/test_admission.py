"""Every registered admission policy, driven through a model of the gate in virtual time: it runs
no more requests than its limit, queues only so many, serves the most important first, frees a
slot per finished request, and decides the same way given the same inputs and clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import registry
from policies.base import (
    AdaptiveLimit,
    AdmissionDecision,
    AdmissionPolicy,
    GateView,
    LatencyWindow,
    LimitState,
)
from tests.conformance.registered import build, check_entry

ADMISSIONS = registry.names("admission")
ADAPTIVE = [
    n for n in ADMISSIONS if isinstance(build("admission", n, AdmissionPolicy), AdaptiveLimit)
]
"""Admission policies whose limit the gate moves with measured service time."""
PROBE_LIMIT = 1_000_000


def admission(name: str) -> AdmissionPolicy:
    policy: AdmissionPolicy = build("admission", name, AdmissionPolicy)
    return policy


def run_capacity(policy: AdmissionPolicy, limit: float | None) -> int:
    """Requests the policy lets run at once: the first running count at which a newcomer (of
    the most important priority, with nobody waiting) does not run."""
    for running in range(PROBE_LIMIT):
        if policy.admit(GateView(running, (), limit), 0).action != "run":
            return running
    raise AssertionError(f"admits over {PROBE_LIMIT} requests at once")


@dataclass
class Gate:
    """What ``ensemble.dataplane.admission.AdmissionGate`` does with the policy's decisions,
    without I/O: requests running, priorities waiting (oldest first), and an adaptive policy's
    limit, fed a window of service times every so many finished requests or so much virtual
    time."""

    policy: AdmissionPolicy
    now_s: float = 0.0
    running: int = 0
    waiting: list[int] = field(default_factory=list)
    limit: LimitState | None = None
    service_s: list[float] = field(default_factory=list)
    peak: int = 0
    log: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.policy, AdaptiveLimit):
            self.limit = self.policy.start(None, self.now_s)

    def view(self) -> GateView:
        limit = None if self.limit is None else self.limit.limit
        return GateView(self.running, tuple(self.waiting), limit)

    def arrive(self, priority: int) -> AdmissionDecision:
        gate = self.view()
        decision = self.policy.admit(gate, priority)
        check_decision(decision, gate, priority)
        self.log.append(decision)
        if decision.action == "shed":
            return decision
        if decision.evict is not None:
            self.waiting.pop(decision.evict)
        if decision.action == "run":
            self.start()
        else:
            self.waiting.append(priority)
            self.wake()
        return decision

    def finish(self, service_s: float) -> None:
        assert self.running > 0
        self.running -= 1
        if isinstance(self.policy, AdaptiveLimit):
            self.record(self.policy, service_s)
        self.wake()

    def start(self) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        assert self.running <= run_capacity(self.policy, self.view().limit), "over the limit"

    def wake(self) -> None:
        while (index := self.policy.next_to_run(gate := self.view())) is not None:
            assert 0 <= index < len(gate.waiting), index
            assert gate.waiting[index] == min(gate.waiting), "the most important starts first"
            self.log.append(index)
            self.waiting.pop(index)
            self.start()

    def record(self, adaptive: AdaptiveLimit, service_s: float) -> None:
        assert self.limit is not None
        self.service_s.append(service_s)
        full = len(self.service_s) >= adaptive.window_requests
        if not full and self.now_s - self.limit.updated_s < adaptive.window_s:
            return
        window = LatencyWindow(tuple(self.service_s), self.peak, self.now_s)
        self.service_s, self.peak = [], self.running
        self.limit = adaptive.update(self.limit, window)
        assert self.limit.limit >= 1.0, self.limit
        self.log.append(self.limit)


def check_decision(decision: AdmissionDecision, gate: GateView, priority: int) -> None:
    assert decision.action in ("run", "wait", "shed")
    if decision.action == "shed":
        assert decision.evict is None and decision.reason, decision
    if decision.evict is not None:
        assert 0 <= decision.evict < len(gate.waiting), decision
        assert gate.waiting[decision.evict] > priority, "evicts only a less important request"
        assert decision.reason, decision


def test_builtins_registered() -> None:
    assert {"bounded", "adaptive"} <= set(ADMISSIONS)
    assert "adaptive" in ADAPTIVE


@pytest.mark.parametrize("name", ADMISSIONS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("admission", name)
    assert admission(name).retry_after_s >= 0.0


@pytest.mark.parametrize("name", ADMISSIONS)
def test_queue_is_bounded_and_full_means_shed(name: str) -> None:
    """With nothing finishing, arrivals fill the running slots, then the queue, then are shed
    (or displace a less important waiter): what the gate holds stops growing."""
    gate = Gate(admission(name))
    held = None
    for i in range(PROBE_LIMIT):
        decision = gate.arrive(priority=i % 3)
        if decision.action == "shed":
            held = gate.running + len(gate.waiting)
            break
    assert held is not None, "never shed"
    for i in range(200):
        gate.arrive(priority=i % 5)
        assert gate.running + len(gate.waiting) == held


@pytest.mark.parametrize("name", ADMISSIONS)
def test_a_finished_request_frees_its_slot(name: str) -> None:
    gate = Gate(admission(name))
    capacity = run_capacity(gate.policy, gate.view().limit)
    for _ in range(capacity):
        assert gate.arrive(0).action == "run"
    assert gate.arrive(0).action != "run"
    waiting = len(gate.waiting)
    gate.finish(0.01)
    # The slot goes to a waiting request when there is one, else to the next newcomer.
    assert gate.running == capacity - (0 if waiting else 1)
    assert len(gate.waiting) == max(waiting - 1, 0)
    while gate.waiting:
        gate.finish(0.01)
    gate.finish(0.01)
    assert gate.arrive(0).action == "run"


ops = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 4)),
        st.tuples(st.just("finish"), st.floats(1e-4, 2.0)),
        st.tuples(st.just("tick"), st.floats(0.0, 5.0)),
    ),
    max_size=400,
)


def replay(name: str, steps: list[tuple[str, float]]) -> Gate:
    gate = Gate(admission(name))
    for op, value in steps:
        if op == "arrive":
            gate.arrive(int(value))
        elif op == "finish" and gate.running:
            gate.finish(value)
        elif op == "tick":
            gate.now_s += value
    return gate


@pytest.mark.parametrize("name", ADMISSIONS)
@settings(max_examples=60, deadline=None)
@given(steps=ops)
def test_any_traffic_keeps_the_limits_and_replays_identically(
    name: str, steps: list[tuple[str, float]]
) -> None:
    """``Gate`` checks every decision as it goes (limit, eviction, priority order); the same
    arrivals, service times and clock give the same decisions and the same limit."""
    first, second = replay(name, steps), replay(name, steps)
    assert first.log == second.log
    assert first.limit == second.limit
    assert (first.running, first.waiting) == (second.running, second.waiting)


@pytest.mark.parametrize("name", ADAPTIVE)
@settings(max_examples=60, deadline=None)
@given(
    windows=st.lists(
        st.tuples(
            st.lists(st.floats(1e-4, 10.0), min_size=1, max_size=50),
            st.integers(0, 500),
            st.floats(0.0, 30.0),
        ),
        max_size=30,
    )
)
def test_adaptive_limit_stays_positive_and_finite_and_survives_a_reload(
    name: str, windows: list[tuple[list[float], int, float]]
) -> None:
    policy = build("admission", name, AdmissionPolicy)
    assert isinstance(policy, AdaptiveLimit)
    assert policy.window_requests >= 1 and policy.window_s > 0
    now = 100.0
    state = policy.start(None, now)
    for service_s, peak, step in windows:
        now += step
        state = policy.update(state, LatencyWindow(tuple(service_s), peak, now))
        assert 1.0 <= state.limit < float("inf"), state
    # A reload hands the state to a fresh policy, which keeps the limit it may keep.
    again = build("admission", name, AdmissionPolicy).start(state, now + 1.0)
    assert again.limit == policy.start(state, now + 1.0).limit
    assert 1.0 <= again.limit < float("inf")
