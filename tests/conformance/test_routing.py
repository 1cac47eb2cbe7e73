"""Every registered routing policy: exactly the ready, non-ejected replicas the contract's tier
allows, each once, reproducible from the injected random generator."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import ReplicaView, RoutingContext
from policies import registry
from policies.base import RoutingPolicy
from tests.conformance.registered import build, check_entry

ROUTINGS = registry.names("routing")
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


def test_builtins_registered() -> None:
    assert {"round_robin", "p2c", "peak_ewma", "tier_preference"} <= set(ROUTINGS)


@pytest.mark.parametrize("name", ROUTINGS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("routing", name)


@pytest.mark.parametrize("name", ROUTINGS)
@settings(max_examples=150, deadline=None)
@given(replicas=replica_sets(), ctx=contexts, seed=st.integers(0, 2**32 - 1))
def test_orders_exactly_the_ready_non_ejected_allowed_replicas(
    name: str, replicas: tuple[ReplicaView, ...], ctx: RoutingContext, seed: int
) -> None:
    policy = build("routing", name, RoutingPolicy)
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
def test_is_reproducible_from_the_rng(name: str) -> None:
    replicas = tuple(
        ReplicaView(f"r{i}", TIERS[i % 2], True, outstanding=i % 3, latency_ewma_s=0.01)
        for i in range(8)
    )
    ctx = RoutingContext("m")
    first = build("routing", name, RoutingPolicy)
    second = build("routing", name, RoutingPolicy)
    runs = [
        [p.route(replicas, ctx, rng) for _ in range(5)]
        for p, rng in ((first, random.Random(7)), (second, random.Random(7)))
    ]
    assert runs[0] == runs[1]
    assert all(set(order) == {r.name for r in replicas} for order in runs[0])
