"""Every registered hedging policy: a finite, non-negative delay only with latency data, and a
budget that runs dry without first calls to earn it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import ReplicaView
from policies import registry
from policies.base import HedgeState, HedgingPolicy
from tests.conformance.registered import build, check_entry

HEDGINGS = registry.names("hedging")


def test_builtins_registered() -> None:
    assert {"percentile", "none"} <= set(HEDGINGS)


@pytest.mark.parametrize("name", HEDGINGS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("hedging", name)


@pytest.mark.parametrize("name", HEDGINGS)
def test_builds_with_defaults_and_starts_a_budget(name: str) -> None:
    policy = build("hedging", name, HedgingPolicy)
    state = policy.initial_state()
    assert isinstance(state, HedgeState)
    assert math.isfinite(state.tokens) and state.tokens >= 0.0


@pytest.mark.parametrize("name", HEDGINGS)
@settings(max_examples=100, deadline=None)
@given(
    p95=st.none() | st.floats(min_value=0.0, max_value=100.0),
    ewma=st.none() | st.floats(min_value=0.0, max_value=100.0),
)
def test_delay_is_none_or_a_finite_wait(name: str, p95: float | None, ewma: float | None) -> None:
    policy = build("hedging", name, HedgingPolicy)
    delay = policy.delay_s(ReplicaView("r", "edge", True, latency_ewma_s=ewma, latency_p95_s=p95))
    if p95 is None:
        assert delay is None, "no latency data: no hedge"
    if delay is not None:
        assert math.isfinite(delay) and delay >= 0.0


@pytest.mark.parametrize("name", HEDGINGS)
@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.sampled_from(["primary", "hedge"]), max_size=300))
def test_budget_is_finite_and_a_refusal_spends_nothing(name: str, ops: list[str]) -> None:
    """Whatever the policy, hedges without primaries run dry: the budget is a real bound."""
    policy = build("hedging", name, HedgingPolicy)
    state = policy.initial_state()
    for op in ops:
        if op == "primary":
            state = policy.on_primary(state)
        else:
            ok, after = policy.try_hedge(state)
            if not ok:
                assert after == state, "a refused hedge spends nothing"
            state = after
    granted = 0
    for _ in range(10_000):
        ok, state = policy.try_hedge(state)
        if not ok:
            break
        granted += 1
    else:
        pytest.fail("hedges kept being granted with no primary calls")
    ok, state = policy.try_hedge(state)
    assert not ok, "once dry, the budget stays dry until primaries earn more"
    assert granted <= 1_000


@pytest.mark.parametrize("name", HEDGINGS)
def test_same_calls_give_the_same_decisions(name: str) -> None:
    first, second = build("hedging", name, HedgingPolicy), build("hedging", name, HedgingPolicy)
    replica = ReplicaView("r", "edge", True, latency_ewma_s=0.01, latency_p95_s=0.05)
    assert first.delay_s(replica) == second.delay_s(replica)
    runs = []
    for policy in (first, second):
        state, decisions = policy.initial_state(), []
        for i in range(60):
            state = policy.on_primary(state)
            if i % 2:
                ok, state = policy.try_hedge(state)
                decisions.append(ok)
        runs.append((decisions, state))
    assert runs[0] == runs[1]
