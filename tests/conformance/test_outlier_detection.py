"""Every registered outlier-detection policy: a healthy replica is never ejected, an ejected one
takes no calls, and any history leaves a replica that answers again routable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import registry
from policies.base import BreakerState, OutlierDetector
from tests.conformance.registered import build, check_entry

OUTLIERS = registry.names("outlier_detection")
OPS = st.lists(st.sampled_from(["ok", "fail", "allow", "tick"]), max_size=200)


def detector(name: str) -> OutlierDetector:
    policy: OutlierDetector = build("outlier_detection", name, OutlierDetector)
    return policy


def replay(policy: OutlierDetector, ops: list[str]) -> tuple[BreakerState, float]:
    """Apply outcomes in virtual time (``tick``: one second passes)."""
    state, now = policy.initial_state(), 0.0
    for op in ops:
        if op == "ok":
            state = policy.on_success(state, now)
        elif op == "fail":
            state = policy.on_failure(state, now)
        elif op == "allow":
            _, state = policy.allow(state, now)
        else:
            now += 1.0
        assert not (policy.is_ejected(state, now) and policy.allow(state, now)[0]), (
            "routing skips the replica but a call may go to it"
        )
    return state, now


def test_builtins_registered() -> None:
    assert {"consecutive_failures", "none"} <= set(OUTLIERS)


@pytest.mark.parametrize("name", OUTLIERS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("outlier_detection", name)


@pytest.mark.parametrize("name", OUTLIERS)
def test_a_replica_that_only_succeeds_is_never_ejected(name: str) -> None:
    policy = detector(name)
    state = policy.initial_state()
    assert isinstance(state, BreakerState)
    for i in range(1_000):
        allowed, state = policy.allow(state, float(i))
        assert allowed
        state = policy.on_success(state, float(i))
        assert not policy.is_ejected(state, float(i))


@pytest.mark.parametrize("name", OUTLIERS)
@settings(max_examples=100, deadline=None)
@given(ops=OPS)
def test_recovers_after_successes(name: str, ops: list[str]) -> None:
    """Any history of outcomes leaves a replica that answers again routable eventually."""
    policy = detector(name)
    state, now = replay(policy, ops)
    allowed = False
    for _ in range(3):  # a probe left unanswered may cost one more ejection period
        now += 1e6
        assert not policy.is_ejected(state, now), "after an ejection period, a probe may go"
        allowed, state = policy.allow(state, now)
        if allowed:
            break
    assert allowed
    state = policy.on_success(state, now)
    assert not policy.is_ejected(state, now)


@pytest.mark.parametrize("name", OUTLIERS)
@settings(max_examples=50, deadline=None)
@given(ops=OPS)
def test_same_outcomes_at_the_same_times_give_the_same_state(name: str, ops: list[str]) -> None:
    assert replay(detector(name), ops) == replay(detector(name), ops)
