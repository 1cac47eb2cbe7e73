"""Conformance of every registered routing, hedging, retry and outlier-detection policy to its
kind's contract."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import ReplicaView, RoutingContext
from policies import registry
from policies.base import RoutingPolicy
from policies.reliability import HedgeState, HedgingPolicy, OutlierDetector, RetryPolicy

ROUTINGS = registry.names("routing")
HEDGINGS = registry.names("hedging")
RETRIES = registry.names("retry")
OUTLIERS = registry.names("outlier_detection")
TIERS = ("edge", "cloud", "gpu")


@st.composite
def replica_sets(draw: st.DrawFn) -> tuple[ReplicaView, ...]:
    """Replicas with unique names, any mix of tiers, readiness, ejection, load and latency."""
    n = draw(st.integers(min_value=0, max_value=12))
    latency = st.none() | st.floats(min_value=1e-5, max_value=5.0)
    return tuple(
        ReplicaView(
            name=f"r{i}",
            tier=draw(st.sampled_from(TIERS)),
            ready=draw(st.booleans()),
            outstanding=draw(st.integers(min_value=0, max_value=20)),
            latency_ewma_s=draw(latency),
            latency_p95_s=draw(latency),
            ejected=draw(st.booleans()),
        )
        for i in range(n)
    )


contexts = st.builds(
    RoutingContext,
    member=st.just("m"),
    tier=st.none() | st.sampled_from(TIERS),
    tier_order=st.permutations(TIERS).map(tuple) | st.just(("edge", "cloud")),
)


def test_builtin_routing_and_hedging_registered() -> None:
    assert {"round_robin", "p2c", "peak_ewma", "tier_preference"} <= set(ROUTINGS)
    assert {"percentile", "none"} <= set(HEDGINGS)


@pytest.mark.parametrize("name", ROUTINGS)
@settings(max_examples=150, deadline=None)
@given(replicas=replica_sets(), ctx=contexts, seed=st.integers(0, 2**32 - 1))
def test_routing_contract(
    name: str, replicas: tuple[ReplicaView, ...], ctx: RoutingContext, seed: int
) -> None:
    policy = registry.build("routing", name, None, RoutingPolicy)
    rng = random.Random(seed)
    expected = {
        r.name
        for r in replicas
        if r.ready and not r.ejected and (ctx.tier is None or r.tier == ctx.tier)
    }
    # Twice: a policy keeping per-instance state (round_robin) must hold the contract on reuse.
    for _ in range(2):
        order = policy.route(replicas, ctx, rng)
        assert isinstance(order, tuple)
        assert all(isinstance(n, str) for n in order)
        assert len(order) == len(set(order)), "no replica twice"
        assert set(order) == expected, "exactly the ready, non-ejected, allowed replicas"


@pytest.mark.parametrize("name", ROUTINGS)
def test_routing_is_reproducible_from_the_rng(name: str) -> None:
    replicas = tuple(
        ReplicaView(f"r{i}", TIERS[i % 2], True, outstanding=i % 3, latency_ewma_s=0.01)
        for i in range(8)
    )
    ctx = RoutingContext("m")
    first = registry.build("routing", name, None, RoutingPolicy)
    second = registry.build("routing", name, None, RoutingPolicy)
    runs = [
        [p.route(replicas, ctx, rng) for _ in range(5)]
        for p, rng in ((first, random.Random(7)), (second, random.Random(7)))
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", HEDGINGS)
def test_hedging_builds_with_defaults(name: str) -> None:
    policy = registry.build("hedging", name, None, HedgingPolicy)
    assert isinstance(policy.initial_state(), HedgeState)


@pytest.mark.parametrize("name", HEDGINGS)
@settings(max_examples=100, deadline=None)
@given(
    p95=st.none() | st.floats(min_value=0.0, max_value=100.0),
    ewma=st.none() | st.floats(min_value=0.0, max_value=100.0),
)
def test_hedge_delay_is_none_or_a_finite_wait(
    name: str, p95: float | None, ewma: float | None
) -> None:
    policy = registry.build("hedging", name, None, HedgingPolicy)
    delay = policy.delay_s(ReplicaView("r", "edge", True, latency_ewma_s=ewma, latency_p95_s=p95))
    if p95 is None:
        assert delay is None, "no latency data: no hedge"
    if delay is not None:
        assert math.isfinite(delay) and delay >= 0.0


@pytest.mark.parametrize("name", HEDGINGS)
@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.sampled_from(["primary", "hedge"]), max_size=300))
def test_hedging_budget_is_finite(name: str, ops: list[str]) -> None:
    """Whatever the policy, hedges without primaries run dry: the budget is a real bound."""
    policy = registry.build("hedging", name, None, HedgingPolicy)
    state = policy.initial_state()
    for op in ops:
        if op == "primary":
            state = policy.on_primary(state)
        else:
            _, state = policy.try_hedge(state)
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


@pytest.mark.parametrize("name", RETRIES)
@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.sampled_from(["request", "retry", "tick"]), max_size=300),
    remaining=st.none() | st.floats(min_value=-1.0, max_value=10.0),
    left=st.integers(min_value=1, max_value=10),
)
def test_retries_stay_within_their_budget(
    name: str, ops: list[str], remaining: float | None, left: int
) -> None:
    """However requests and retries interleave, retries granted within one window never
    exceed what a budget of ratio 1 plus its floor could give, and attempt timeouts are sane."""
    policy = registry.build("retry", name, None, RetryPolicy)
    assert policy.max_attempts >= 1
    state, now, requests, granted = policy.initial_state(), 0.0, 0, 0
    for op in ops:
        if op == "request":
            state, requests = policy.on_request(state, now), requests + 1
        elif op == "retry":
            ok, state = policy.try_retry(state, now)
            granted += ok
        else:
            now += 0.001
    if policy.max_attempts == 1:
        assert granted == 0, "a policy of one attempt never retries"
    assert granted <= requests + 1_000
    timeout = policy.attempt_timeout_s(remaining, left)
    if remaining is None or left == 1:
        assert timeout is None, "no deadline or last attempt: the request's deadline rules"
    if timeout is not None:
        assert math.isfinite(timeout) and timeout >= 0.0


@pytest.mark.parametrize("name", OUTLIERS)
@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.sampled_from(["ok", "fail", "allow", "tick"]), max_size=200))
def test_outlier_detection_recovers_after_successes(name: str, ops: list[str]) -> None:
    """Any history of outcomes leaves a replica that answers again routable eventually."""
    policy = registry.build("outlier_detection", name, None, OutlierDetector)
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
    for _ in range(3):  # a probe left unanswered may cost one more ejection period
        now += 1e6
        assert not policy.is_ejected(state, now), "after an ejection period, a probe may go"
        allowed, state = policy.allow(state, now)
        if allowed:
            break
    assert allowed
    state = policy.on_success(state, now)
    assert not policy.is_ejected(state, now)
