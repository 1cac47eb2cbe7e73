"""Behaviour of the built-in routing policies: rotation, power of two, peak EWMA, tiers."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ensemble.types import ReplicaView, RoutingContext
from policies import registry
from policies.base import RoutingPolicy
from policies.routing import (
    PeakEwmaParams,
    PeakEwmaRouter,
    TierPreferenceParams,
    TierPreferenceRouter,
    decayed_latency_s,
    eligible,
    p2c_order,
)

CTX = RoutingContext("m")


def rv(
    name: str,
    tier: str = "edge",
    *,
    outstanding: int = 0,
    ewma: float | None = None,
    ready: bool = True,
    ejected: bool = False,
    age: float | None = None,
) -> ReplicaView:
    return ReplicaView(name, tier, ready, outstanding, ewma, None, ejected, age)


def router(name: str, **params: object) -> RoutingPolicy:
    policy: RoutingPolicy = registry.build("routing", name, params, RoutingPolicy)
    return policy


def test_eligible_filters_unready_ejected_and_other_tiers() -> None:
    replicas = [rv("a"), rv("b", ready=False), rv("c", ejected=True), rv("d", "cloud")]
    assert [r.name for r in eligible(replicas, CTX)] == ["a", "d"]
    assert [r.name for r in eligible(replicas, RoutingContext("m", tier="cloud"))] == ["d"]


# --- round_robin ---------------------------------------------------------------------------


def test_round_robin_rotates_in_name_order() -> None:
    policy = router("round_robin")
    replicas = [rv("c"), rv("a"), rv("b")]
    rng = random.Random(0)
    firsts = [policy.route(replicas, CTX, rng)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert policy.route(replicas, CTX, rng) == ("a", "b", "c")


def test_round_robin_skips_unready_and_spreads_evenly() -> None:
    policy = router("round_robin")
    replicas = [rv("a"), rv("b", ready=False), rv("c"), rv("d", ejected=True)]
    counts = Counter(policy.route(replicas, CTX, random.Random(0))[0] for _ in range(100))
    assert counts == {"a": 50, "c": 50}


def test_round_robin_with_nothing_eligible() -> None:
    assert router("round_robin").route([rv("a", ready=False)], CTX, random.Random(0)) == ()


# --- p2c -----------------------------------------------------------------------------------


def test_p2c_of_two_takes_fewer_outstanding() -> None:
    policy = router("p2c")
    replicas = [rv("busy", outstanding=5), rv("idle", outstanding=1)]
    for seed in range(50):
        assert policy.route(replicas, CTX, random.Random(seed)) == ("idle", "busy")


def test_p2c_breaks_ties_by_latency_ewma() -> None:
    policy = router("p2c")
    replicas = [rv("slow", outstanding=2, ewma=0.2), rv("fast", outstanding=2, ewma=0.01)]
    for seed in range(50):
        assert policy.route(replicas, CTX, random.Random(seed))[0] == "fast"


def test_p2c_prefers_unmeasured_replica_on_equal_load() -> None:
    policy = router("p2c")
    replicas = [rv("known", ewma=0.01), rv("new")]
    for seed in range(20):
        assert policy.route(replicas, CTX, random.Random(seed))[0] == "new"


def test_p2c_never_puts_the_most_loaded_first_and_favours_the_least() -> None:
    policy = router("p2c")
    replicas = [rv("a", outstanding=0), rv("b", outstanding=3), rv("c", outstanding=9)]
    rng = random.Random(1)
    firsts = Counter(policy.route(replicas, CTX, rng)[0] for _ in range(3000))
    assert firsts["c"] == 0
    # "a" wins whenever it is one of the two sampled: 2 of the 3 possible pairs.
    assert 0.62 < firsts["a"] / 3000 < 0.71


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 10), min_size=2, max_size=10),
    seed=st.integers(0, 2**32 - 1),
)
def test_p2c_order_first_beats_someone(loads: list[int], seed: int) -> None:
    """The winner of a draw of two is never strictly the most loaded of all."""
    replicas = [rv(f"r{i}", outstanding=n) for i, n in enumerate(loads)]
    order = p2c_order(replicas, random.Random(seed))
    assert sorted(r.name for r in order) == sorted(r.name for r in replicas)
    if loads.count(max(loads)) == 1:
        assert order[0].outstanding < max(loads)


# --- peak_ewma -----------------------------------------------------------------------------


def test_peak_ewma_orders_by_latency_times_queue() -> None:
    policy = router("peak_ewma")
    replicas = [
        rv("a", ewma=0.010, outstanding=0),  # cost 0.010
        rv("b", ewma=0.002, outstanding=9),  # cost 0.020
        rv("c", outstanding=0),  # unknown: 0.001 (the optimistic default)
        rv("d", ewma=0.001, outstanding=3),  # cost 0.004
    ]
    assert policy.route(replicas, CTX, random.Random(0)) == ("c", "d", "a", "b")


def test_peak_ewma_unknown_latency_param() -> None:
    policy = PeakEwmaRouter(PeakEwmaParams(unknown_latency_s=1.0))
    replicas = [rv("new"), rv("known", ewma=0.1, outstanding=2)]
    assert policy.route(replicas, CTX, random.Random(0)) == ("known", "new")
    assert policy.cost(rv("new", outstanding=1)) == pytest.approx(2.0)


def test_peak_ewma_breaks_equal_costs_at_random() -> None:
    policy = router("peak_ewma")
    replicas = [rv(n, ewma=0.01) for n in "abcd"]
    firsts = {policy.route(replicas, CTX, random.Random(seed))[0] for seed in range(100)}
    assert firsts == set("abcd")


def test_peak_ewma_params_validated() -> None:
    with pytest.raises(ValidationError):
        registry.lookup("routing", "peak_ewma").build({"unknown_latency_s": 0})
    with pytest.raises(ValidationError):
        registry.lookup("routing", "peak_ewma").build({"decay_s": 0})
    with pytest.raises(ValidationError):
        registry.lookup("routing", "peak_ewma").build({"decay": 1})  # a misspelling: refused


def test_a_replica_slow_once_and_idle_since_is_tried_again() -> None:
    """At low load outstanding calls are all 0 and latency alone decides: a replica whose
    EWMA is stale (no call for a while) fades toward 0, as Finagle's and Linkerd's peak EWMA
    do, and wins again; freshly measured, the same EWMA keeps it behind."""
    fast = rv("fast", ewma=0.002, age=0.0)
    slow_now = rv("slow", ewma=0.050, age=0.0)
    slow_then = rv("slow", ewma=0.050, age=60.0)  # 50 ms * exp(-6) = 0.12 ms
    assert decayed_latency_s(slow_then, 10.0) == pytest.approx(0.050 * math.exp(-6))
    assert decayed_latency_s(rv("new"), 10.0) is None
    rng = random.Random(0)
    for policy in (router("p2c"), router("peak_ewma")):
        assert policy.route([fast, slow_now], CTX, rng)[0] == "fast"
        assert policy.route([slow_now, fast], CTX, rng)[0] == "fast"
        assert policy.route([fast, slow_then], CTX, rng)[0] == "slow"
        assert policy.route([slow_then, fast], CTX, rng)[0] == "slow"
    # A shorter time constant fades it sooner.
    slow_recent = rv("slow", ewma=0.050, age=20.0)  # 10 s: 6.8 ms; 2 s: 2 us
    assert router("peak_ewma").route([fast, slow_recent], CTX, rng)[0] == "fast"
    assert router("peak_ewma", decay_s=2.0).route([fast, slow_recent], CTX, rng)[0] == "slow"


# --- tier_preference -----------------------------------------------------------------------


def tiers_of(order: tuple[str, ...]) -> list[str]:
    return [name.split("/")[0] for name in order]


def test_tier_preference_edge_first_then_cloud() -> None:
    policy = router("tier_preference")
    replicas = [rv("cloud/0", "cloud"), rv("edge/0", "edge"), rv("edge/1", "edge")]
    for seed in range(20):
        order = policy.route(replicas, CTX, random.Random(seed))
        assert tiers_of(order) == ["edge", "edge", "cloud"]


def test_tier_preference_follows_context_order() -> None:
    policy = router("tier_preference")
    replicas = [rv("cloud/0", "cloud"), rv("edge/0", "edge")]
    ctx = RoutingContext("m", tier_order=("cloud", "edge"))
    assert policy.route(replicas, ctx, random.Random(0)) == ("cloud/0", "edge/0")


def test_tier_preference_spills_over_when_edge_saturated() -> None:
    policy = TierPreferenceRouter(TierPreferenceParams(max_outstanding=4))
    saturated = [rv("edge/0", outstanding=4), rv("edge/1", outstanding=7), rv("cloud/0", "cloud")]
    assert tiers_of(policy.route(saturated, CTX, random.Random(0))) == ["cloud", "edge", "edge"]
    # One edge replica below the limit keeps the whole edge tier in front.
    one_free = [rv("edge/0", outstanding=3), rv("edge/1", outstanding=7), rv("cloud/0", "cloud")]
    order = policy.route(one_free, CTX, random.Random(0))
    assert order == ("edge/0", "edge/1", "cloud/0")


def test_tier_preference_spills_over_when_no_edge_ready() -> None:
    policy = router("tier_preference")
    replicas = [rv("edge/0", ready=False), rv("edge/1", ejected=True), rv("cloud/0", "cloud")]
    assert policy.route(replicas, CTX, random.Random(0)) == ("cloud/0",)


def test_tier_preference_respects_tier_restriction() -> None:
    policy = router("tier_preference", max_outstanding=1)
    replicas = [rv("edge/0", outstanding=5), rv("cloud/0", "cloud")]
    ctx = RoutingContext("m", tier="edge")
    assert policy.route(replicas, ctx, random.Random(0)) == ("edge/0",)


def test_tier_preference_puts_unlisted_tiers_last() -> None:
    policy = router("tier_preference")
    replicas = [rv("gpu/0", "gpu"), rv("cloud/0", "cloud"), rv("edge/0", "edge")]
    assert policy.route(replicas, CTX, random.Random(0)) == ("edge/0", "cloud/0", "gpu/0")


def test_tier_preference_uses_p2c_within_a_tier() -> None:
    policy = router("tier_preference")
    replicas = [rv("edge/0", outstanding=6), rv("edge/1", outstanding=1)]
    for seed in range(20):
        assert policy.route(replicas, CTX, random.Random(seed)) == ("edge/1", "edge/0")


def test_tier_preference_params_validated() -> None:
    with pytest.raises(ValidationError):
        registry.lookup("routing", "tier_preference").build({"max_outstanding": 0})
    with pytest.raises(ValidationError):
        registry.lookup("routing", "tier_preference").build({"max_outstandng": 3})
