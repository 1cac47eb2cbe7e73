"""Every registered autoscaling policy, in virtual time: targets only for known placements, within
their bounds (and the tier caps, for the policies that honour caps), a reason for each, and the
same decisions from the same contexts and state."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import registry
from policies.base import AutoscalingPolicy, PlacementLoad, ScalingContext, ScalingDecision
from tests.conformance.registered import build, check_entry

AUTOSCALINGS = registry.names("autoscaling")
CAP_AWARE = {"capacity", "slo_feedback", "r3e"}
"""Policies that keep a tier's total within ``tiers.NAME.max_replicas`` (``target_inflight``,
Ray Serve's per-deployment rule, knows no tiers)."""


def autoscaling(name: str) -> AutoscalingPolicy:
    policy: AutoscalingPolicy = build("autoscaling", name, AutoscalingPolicy)
    return policy


@st.composite
def contexts(draw: st.DrawFn) -> ScalingContext:
    """Up to three members on edge and cloud with any load, readiness, latency and price."""
    loads = []
    for member in ("a", "b", "c")[: draw(st.integers(1, 3))]:
        for tier in draw(st.sampled_from([("edge",), ("edge", "cloud"), ("cloud",)])):
            low = draw(st.integers(0, 3))
            high = draw(st.integers(max(low, 1), 8))
            replicas = draw(st.integers(low, high))
            latency = st.none() | st.floats(0.5, 2000.0)
            loads.append(
                PlacementLoad(
                    member,
                    tier,
                    replicas,
                    low,
                    high,
                    draw(st.floats(0.0, 50.0)),
                    draw(st.floats(0.0, 500.0)),
                    draw(latency),
                    ready_replicas=draw(st.none() | st.integers(0, replicas)),
                    failures_rps=draw(st.floats(0.0, 10.0)),
                    service_ms=draw(latency),
                    cost_per_replica_hour=draw(st.floats(0.0, 5.0)),
                )
            )
    caps = draw(st.dictionaries(st.sampled_from(["edge", "cloud"]), st.integers(6, 20)))
    return ScalingContext(0.0, tuple(loads), caps)


def check(decision: ScalingDecision, context: ScalingContext, name: str) -> None:
    loads = {x.key: x for x in context.placements}
    assert set(decision.targets) <= set(loads)
    for key, target in decision.targets.items():
        assert loads[key].min_replicas <= target <= loads[key].max_replicas, (key, target)
        assert decision.reasons[key], key
    if name in CAP_AWARE:
        for tier, cap in context.tier_max_replicas.items():
            on_tier = [x for x in context.placements if x.tier == tier]
            if sum(x.min_replicas for x in on_tier) <= cap:
                total = sum(decision.targets.get(x.key, x.replicas) for x in on_tier)
                assert total <= cap, (tier, total, cap)


def moved_to(decision: ScalingDecision, context: ScalingContext, step_s: float) -> ScalingContext:
    """The next window: the counts reached their targets and ``step_s`` passed."""
    placements = tuple(
        replace(x, replicas=decision.targets.get(x.key, x.replicas), ready_replicas=None)
        for x in context.placements
    )
    return ScalingContext(context.now_s + step_s, placements, context.tier_max_replicas)


def test_builtins_registered() -> None:
    assert {"target_inflight", "capacity", "slo_feedback", "r3e"} <= set(AUTOSCALINGS)
    assert set(AUTOSCALINGS) >= CAP_AWARE


@pytest.mark.parametrize("name", AUTOSCALINGS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("autoscaling", name)


@pytest.mark.parametrize("name", AUTOSCALINGS)
@settings(max_examples=60, deadline=None)
@given(first=contexts(), steps=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=4))
def test_targets_within_bounds_and_caps_with_a_reason(
    name: str, first: ScalingContext, steps: list[float]
) -> None:
    """Across decisions with the state threaded through (the counts move to the targets in
    between)."""
    policy = autoscaling(name)
    state, context = policy.initial_state(), first
    for step in steps:
        decision, state = policy.decide(context, state)
        check(decision, context, name)
        context = moved_to(decision, context, step)


@pytest.mark.parametrize("name", AUTOSCALINGS)
@settings(max_examples=40, deadline=None)
@given(first=contexts(), steps=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=4))
def test_same_contexts_and_state_give_the_same_decisions(
    name: str, first: ScalingContext, steps: list[float]
) -> None:
    """A pure function of (context, state): deciding twice from one state, or with a second
    instance, changes nothing (the policy keeps no state of its own, nor mutates the caller's)."""
    policy, twin = autoscaling(name), autoscaling(name)
    state, twin_state, context = policy.initial_state(), twin.initial_state(), first
    for step in steps:
        decision, next_state = policy.decide(context, state)
        assert policy.decide(context, state) == (decision, next_state)
        twin_decision, twin_state = twin.decide(context, twin_state)
        assert twin_decision == decision
        state = next_state
        context = moved_to(decision, context, step)
    assert twin_state == state
