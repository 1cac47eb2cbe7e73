"""The `capacity`, `slo_feedback` and `r3e` autoscaling policies in virtual time (every
registered one runs through the same contract in tests/conformance/test_autoscaling.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from policies import registry
from policies.autoscaling import Capacity, CapacityParams, SloFeedback, SloFeedbackParams
from policies.autoscaling_r3e import R3e, R3eParams, R3eState
from policies.base import AutoscalingPolicy, PlacementLoad, ScalingContext

EDGE, CLOUD = ("m", "edge"), ("m", "cloud")


def place(
    tier: str = "edge",
    replicas: int = 1,
    low: int = 1,
    high: int = 8,
    *,
    member: str = "m",
    outstanding: float = 0.0,
    rps: float = 0.0,
    p95_ms: float | None = None,
    ready: int | None = None,
    failures_rps: float = 0.0,
    service_ms: float | None = 100.0,
    price: float = 0.0,
    link_ms: float = 0.0,
) -> PlacementLoad:
    """One placement; a replica serves 1000 / 100 ms = 10 req/s unless told otherwise."""
    return PlacementLoad(
        member,
        tier,
        replicas,
        low,
        high,
        outstanding,
        rps,
        p95_ms,
        ready_replicas=ready,
        failures_rps=failures_rps,
        service_ms=service_ms,
        cost_per_replica_hour=price,
        link_ms=link_ms,
    )


def ctx(now_s: float, *loads: PlacementLoad, caps: dict[str, int] | None = None) -> ScalingContext:
    return ScalingContext(now_s, loads, caps or {})


# capacity (INFaaS)


def test_capacity_adds_infaas_ceil_of_missing_throughput() -> None:
    policy = Capacity(CapacityParams())
    decision, _ = policy.decide(ctx(0.0, place(replicas=2, rps=37.0)), policy.initial_state())
    # T = 1000 / 100 ms = 10 req/s; 37 x 1.2 = 44.4 req/s; ceil((44.4 - 2 x 10) / 10) = +3.
    assert decision.targets == {EDGE: 5}
    assert "+3 = ceil((44.4 - 2 x 10.0) / 10.0)" in decision.reasons[EDGE]
    # At half utilization a replica carries 5 req/s: ceil(44.4 / 5) = 9, capped at max 8.
    half = Capacity(CapacityParams(max_utilization=0.5))
    decision, _ = half.decide(ctx(0.0, place(replicas=2, rps=37.0)), half.initial_state())
    assert decision.targets == {EDGE: 8}


def test_capacity_falls_back_to_p95_and_skips_unknown_latency() -> None:
    policy = Capacity(CapacityParams(headroom=1.0))
    slow = place(replicas=1, rps=12.0, service_ms=None, p95_ms=250.0)  # 4 req/s per replica
    decision, _ = policy.decide(ctx(0.0, slow), {})
    assert decision.targets == {EDGE: 3}
    blind = place(replicas=1, rps=500.0, service_ms=None, p95_ms=None)
    decision, state = policy.decide(ctx(0.0, blind), {})
    assert decision.targets == {} and state == {}


def test_capacity_scales_down_only_after_consecutive_low_signals() -> None:
    policy = Capacity(CapacityParams())
    state = policy.initial_state()
    quiet = place(replicas=5, rps=5.0)  # 6 req/s fits in one replica
    for i in range(9):
        decision, state = policy.decide(ctx(float(i), quiet), state)
        assert decision.targets == {}, i
    busy = place(replicas=5, rps=45.0)  # 54 req/s needs 6 > 5: not low, the count restarts
    decision, state = policy.decide(ctx(9.0, busy), state)
    assert decision.targets == {EDGE: 6}
    for i in range(9):
        decision, state = policy.decide(ctx(10.0 + i, quiet), state)
        assert decision.targets == {}
    decision, state = policy.decide(ctx(19.0, quiet), state)
    assert decision.targets == {EDGE: 1}
    assert "10 consecutive low signals" in decision.reasons[EDGE]


def test_capacity_upscale_delay_and_tier_cap() -> None:
    policy = Capacity(CapacityParams(upscale_delay_s=2))
    state = policy.initial_state()
    busy = place(replicas=1, rps=30.0)
    decision, state = policy.decide(ctx(0.0, busy), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(2.0, busy), state)
    assert decision.targets == {EDGE: 4}
    # Two members that each want 4 on an edge capped at 5 replicas share it.
    now = Capacity(CapacityParams())
    loads = (place(member="a", rps=30.0), place(member="b", rps=30.0))
    decision, _ = now.decide(ctx(0.0, *loads, caps={"edge": 5}), {})
    assert sum(decision.targets.values()) == 5
    assert all(n >= 1 for n in decision.targets.values())
    assert any("edge tier cap 5" in r for r in decision.reasons.values())


# slo_feedback


def test_slo_feedback_adds_in_proportion_to_the_p95_miss_then_waits_for_a_fresh_window() -> None:
    policy = SloFeedback(SloFeedbackParams(p95_slo_ms=100, upscale_delay_s=2))
    state = policy.initial_state()
    slow = place(replicas=2, p95_ms=150.0, rps=10.0)
    decision, state = policy.decide(ctx(0.0, slow), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(2.0, slow), state)
    assert decision.targets == {EDGE: 3}  # 1.5x over: ceil(2 x 0.5) = +1
    assert "p95 150 ms vs SLO 100 ms" in decision.reasons[EDGE]
    decision, state = policy.decide(ctx(3.0, place(replicas=3, p95_ms=150.0)), state)
    assert decision.targets == {}  # the step restarted the delay
    very = place(replicas=4, p95_ms=400.0)  # 4x over: ceil(4 x 3) = 12, at most 4 a step
    _, state = policy.decide(ctx(10.0, very), policy.initial_state())
    decision, _ = policy.decide(ctx(12.0, very), state)
    assert decision.targets == {EDGE: 8}


def test_slo_feedback_adds_when_failures_burn_the_error_budget() -> None:
    policy = SloFeedback(SloFeedbackParams(error_budget=0.01, upscale_delay_s=0))
    failing = place(replicas=2, rps=100.0, failures_rps=2.0, p95_ms=20.0)  # 2% = burn 2
    decision, _ = policy.decide(ctx(0.0, failing), {})
    assert decision.targets == {EDGE: 4}  # ceil(2 x (2 - 1)) = +2
    assert "error-budget burn 2.0" in decision.reasons[EDGE]
    within = place(replicas=2, rps=100.0, failures_rps=0.5, p95_ms=60.0)  # burn 0.5, p95 ok
    decision, _ = policy.decide(ctx(0.0, within), {})
    assert decision.targets == {}


def test_slo_feedback_removes_one_at_a_time_after_the_delay_when_quiet() -> None:
    policy = SloFeedback(SloFeedbackParams(downscale_delay_s=30))
    state = policy.initial_state()
    quiet = place(replicas=3, p95_ms=20.0, outstanding=0.5, rps=5.0)
    for t in (0.0, 29.0):
        decision, state = policy.decide(ctx(t, quiet), state)
        assert decision.targets == {}
    decision, state = policy.decide(ctx(30.0, quiet), state)
    assert decision.targets == {EDGE: 2}
    quiet2 = place(replicas=2, p95_ms=20.0, outstanding=0.5, rps=5.0)
    decision, state = policy.decide(ctx(31.0, quiet2), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(60.0, quiet2), state)
    assert decision.targets == {EDGE: 1}
    # Low latency but busy replicas (5 in flight on 2 remaining) is not quiet.
    busy = place(replicas=3, p95_ms=20.0, outstanding=5.0)
    decision, state = policy.decide(ctx(0.0, busy), {})
    assert decision.targets == {} and state == {}
    # Never below min, never above max.
    at_min = place(replicas=1, p95_ms=1.0)
    assert policy.decide(ctx(99.0, at_min), {})[0].targets == {}
    at_max = place(replicas=8, p95_ms=900.0)
    assert policy.decide(ctx(99.0, at_max), {})[0].targets == {}


# r3e


def r3e(**params: Any) -> R3e:
    return R3e(R3eParams(**{"upscale_delay_s": 0, "lookahead_s": 0, **params}))


def edge(replicas: int = 1, **kw: Any) -> PlacementLoad:
    return place("edge", replicas, kw.pop("low", 1), kw.pop("high", 4), **kw)


def cloud(replicas: int = 0, **kw: Any) -> PlacementLoad:
    return place("cloud", replicas, kw.pop("low", 0), kw.pop("high", 8), **kw)


def test_r3e_fills_the_edge_first_with_a_spare() -> None:
    policy = r3e()
    decision, _ = policy.decide(ctx(0.0, edge(1, rps=20.0), cloud()), policy.initial_state())
    # 20 x 1.2 = 24 req/s at 10 per replica: 3, +1 spare on the edge; the cloud stays at 0.
    assert decision.targets == {EDGE: 4}
    assert (
        decision.reasons[EDGE]
        == "20.0 req/s x1.2 needs 3 at 10.0 req/s per replica; +1 spare on edge"
    )
    decision, _ = r3e(spare=0).decide(ctx(0.0, edge(1, rps=20.0), cloud()), R3eState())
    assert decision.targets == {EDGE: 3}


def test_r3e_bursts_to_the_cloud_when_the_edge_is_full() -> None:
    policy = r3e()
    decision, _ = policy.decide(ctx(0.0, edge(4, rps=45.0), cloud()), policy.initial_state())
    # 54 req/s needs 6: 4 on the edge (its max), 2 burst to the cloud, the spare with them.
    assert decision.targets == {CLOUD: 3}
    assert decision.reasons[CLOUD] == (
        "45.0 req/s x1.2 needs 6 at 10.0 req/s per replica; edge full (4/4) -> burst 2 to "
        "cloud; +1 spare on cloud"
    )


def test_r3e_puts_the_spare_on_the_next_tier_when_the_edge_bounds_forbid_it() -> None:
    policy = r3e()
    decision, _ = policy.decide(ctx(0.0, edge(1, high=1, rps=5.0), cloud()), R3eState())
    assert decision.targets == {CLOUD: 1}
    assert "+1 spare on cloud" in decision.reasons[CLOUD]


def test_r3e_bursts_when_the_full_edge_misses_its_latency_slo() -> None:
    policy = r3e(p95_slo_ms=100)
    loads = (edge(4, rps=20.0, p95_ms=180.0), cloud(0))  # rate says 3 + spare: fits
    decision, _ = policy.decide(ctx(0.0, *loads), R3eState())
    assert decision.targets == {CLOUD: 1}
    assert (
        "edge p95 180 ms > SLO 100 ms at its max (4/4) -> +1 on cloud" in (decision.reasons[CLOUD])
    )
    fast = (edge(4, rps=20.0, p95_ms=40.0), cloud(0))
    assert policy.decide(ctx(0.0, *fast), R3eState())[0].targets == {}
    # A p95 still high after the burst (it lags) asks for no more than need + 1.
    lagging = (edge(4, rps=20.0, p95_ms=180.0), cloud(1))
    assert policy.decide(ctx(1.0, *lagging), R3eState())[0].targets == {}


def test_r3e_replaces_replicas_that_are_not_ready_but_not_ones_it_just_started() -> None:
    policy = r3e()
    loads = (edge(3, high=8, ready=1, rps=15.0), cloud())
    decision, state = policy.decide(ctx(0.0, *loads), R3eState())
    # 18 req/s: 2 + 1 spare ready ones wanted; 2 of the 3 do not take calls -> 5.
    assert decision.targets == {EDGE: 5}
    assert "2 not ready on edge: replaced" in decision.reasons[EDGE]
    # The 2 it added are loading a second later: starting, not failed, so no second round.
    loading = (edge(5, high=8, ready=3, rps=15.0), cloud())
    decision, state = policy.decide(ctx(1.0, *loading), state)
    assert decision.targets == {}
    # Bounded: a placement with every replica down asks for no more than its max.
    down = (edge(4, ready=0, rps=30.0), cloud())
    decision, _ = policy.decide(ctx(0.0, *down), R3eState())
    assert decision.targets == {CLOUD: 5}  # the edge stays at 4: 36 req/s -> 4 + spare burst


def test_r3e_scales_ahead_of_a_rising_load_but_not_down_on_a_falling_one() -> None:
    ahead, reactive = r3e(lookahead_s=5), r3e(lookahead_s=0)
    a_state, r_state = R3eState(), R3eState()

    def loads(rate: float, n: int) -> tuple[PlacementLoad, ...]:
        return (edge(n, high=8, rps=rate), cloud())

    for t, rate in enumerate((5.0, 10.0, 15.0)):
        _, a_state = ahead.decide(ctx(float(t), *loads(rate, 2)), a_state)
        _, r_state = reactive.decide(ctx(float(t), *loads(rate, 2)), r_state)
    a, _ = ahead.decide(ctx(3.0, *loads(20.0, 2)), a_state)
    r, _ = reactive.decide(ctx(3.0, *loads(20.0, 2)), r_state)
    assert r.targets == {EDGE: 4}  # 24 req/s: 3 + spare
    assert a.targets == {EDGE: 7}  # +5 req/s per s for 5 s: 45 x 1.2 = 54: 6 + spare
    assert "trending +5.00 req/s per s -> 45.0 in 5 s" in a.reasons[EDGE]
    state = R3eState()
    for t, rate in enumerate((40.0, 30.0, 20.0)):  # falling: sized by the rate now
        decision, state = ahead.decide(ctx(float(t), *loads(rate, 4)), state)
    assert "trending" not in decision.reasons.get(EDGE, "")


def test_r3e_scales_a_burst_placement_to_zero_only_after_its_cooldown() -> None:
    policy = r3e(downscale_delay_s=30, scale_to_zero_after_s=60)
    state = policy.initial_state()

    def quiet(n: int) -> tuple[PlacementLoad, ...]:  # the edge covers it, with its spare
        return (edge(2, rps=5.0), cloud(n))

    decision, state = policy.decide(ctx(0.0, *quiet(2)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(29.0, *quiet(2)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(30.0, *quiet(2)), state)
    assert decision.targets == {CLOUD: 1}  # one step; the last replica waits for 60 s
    decision, state = policy.decide(ctx(59.0, *quiet(1)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(60.0, *quiet(1)), state)
    assert decision.targets == {CLOUD: 0}
    assert "no burst need for 60 s -> scale to zero" in decision.reasons[CLOUD]
    # Burst need in the meantime restarts the cooldown.
    state = policy.initial_state()
    _, state = policy.decide(ctx(0.0, *quiet(1)), state)
    _, state = policy.decide(ctx(50.0, edge(4, rps=40.0), cloud(1)), state)  # needs the cloud
    decision, state = policy.decide(ctx(100.0, *quiet(1)), state)
    assert decision.targets == {}
    decision, _ = policy.decide(ctx(110.0, *quiet(1)), state)
    assert decision.targets == {CLOUD: 0}
    # A burst replica that is not ready is not replaced when nothing needs the tier.
    state = policy.initial_state()
    broken = (edge(2, rps=5.0), cloud(1, ready=0))
    decision, state = policy.decide(ctx(0.0, *broken), state)
    assert decision.targets == {}
    decision, _ = policy.decide(ctx(60.0, *broken), state)
    assert decision.targets == {CLOUD: 0}


def test_r3e_trims_the_dearest_burst_replicas_to_the_cost_budget() -> None:
    policy = r3e(max_cost_per_hour=4.0)
    loads = (edge(4, rps=45.0, price=0.5), cloud(0, price=1.0))
    decision, _ = policy.decide(ctx(0.0, *loads), R3eState())
    # Wants 3 on the cloud: 4 x 0.5 + 3 x 1 = 5/h; one cloud replica goes.
    assert decision.targets == {CLOUD: 2}
    assert (
        "cost 5.00/h over budget 4/h: -1 burst on cloud (now 4.00/h)" in (decision.reasons[CLOUD])
    )
    # Two burst tiers: the dearer one (gpu, after cloud as an unlisted tier) goes first.
    two = (
        place("edge", 4, 1, 4, member="a", rps=45.0),
        place("cloud", 0, 0, 8, member="a", price=1.0),
        place("edge", 4, 1, 4, member="b", rps=45.0),
        place("gpu", 0, 0, 8, member="b", price=3.0),
    )
    decision, _ = r3e(max_cost_per_hour=6.0).decide(ctx(0.0, *two), R3eState())
    assert decision.targets == {("a", "cloud"): 3, ("b", "gpu"): 1}
    # Never below a placement's minimum, even with no budget at all.
    decision, _ = r3e(max_cost_per_hour=0.0).decide(
        ctx(0.0, edge(2, rps=45.0, price=1.0), cloud(0, price=1.0)), R3eState()
    )
    assert decision.targets == {EDGE: 1}


def test_r3e_shares_a_capped_tier_and_bursts_the_rest() -> None:
    policy = r3e()
    loads = (
        place("edge", 1, 1, 4, member="a", rps=25.0),
        place("cloud", 0, 0, 8, member="a"),
        place("edge", 1, 1, 4, member="b", rps=25.0),
        place("cloud", 0, 0, 8, member="b"),
    )
    decision, _ = policy.decide(ctx(0.0, *loads, caps={"edge": 5}), R3eState())
    # Each needs 3 + spare = 4 on the edge, 8 > 5: the largest gives back first.
    assert decision.targets == {
        ("a", "edge"): 3,
        ("b", "edge"): 2,
        ("b", "cloud"): 2,
        ("a", "cloud"): 1,
    }
    assert "edge full (2/2) -> burst 1 to cloud" in decision.reasons[("b", "cloud")]


def test_r3e_hysteresis_up_after_its_delay_down_one_step_at_a_time() -> None:
    policy = r3e(upscale_delay_s=1, downscale_delay_s=30)
    state = policy.initial_state()
    busy = (edge(1, rps=20.0), cloud())
    decision, state = policy.decide(ctx(0.0, *busy), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(1.0, *busy), state)
    assert decision.targets == {EDGE: 4}  # straight to the need

    def idle(n: int) -> tuple[PlacementLoad, ...]:  # wants 0 + spare = 1
        return (edge(n), cloud())

    decision, state = policy.decide(ctx(2.0, *idle(4)), state)
    decision, state = policy.decide(ctx(31.0, *idle(4)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ctx(32.0, *idle(4)), state)
    assert decision.targets == {EDGE: 3}
    decision, state = policy.decide(ctx(33.0, *idle(3)), state)
    assert decision.targets == {EDGE: 2}
    # The load comes back for one decision: the downscale delay starts over.
    decision, state = policy.decide(ctx(34.0, edge(2, rps=20.0), cloud()), state)
    decision, state = policy.decide(ctx(35.0, *idle(2)), state)
    assert decision.targets == {}
    decision, _ = policy.decide(ctx(65.0, *idle(2)), state)
    assert decision.targets == {EDGE: 1}


def test_r3e_sizes_a_queue_by_littles_law_not_a_replica_per_queued_call() -> None:
    # 5 req/s at 10 req/s per replica keeps 0.5 calls busy; the other 5.5 in flight wait.
    # Serving them within drain_s (1 s) takes 5 + 5.5 = 10.5 req/s: 2 replicas, +1 spare.
    policy = r3e()
    decision, _ = policy.decide(ctx(0.0, edge(1, outstanding=6.0, rps=5.0), cloud()), R3eState())
    assert decision.targets == {EDGE: 3}
    assert decision.reasons[EDGE].startswith(
        "5.0 req/s + 5.5 queued / 1 s needs 2 at 10.0 req/s per replica"
    )
    # A deep queue (30 in flight) asks for 35 req/s, 4 replicas +1; Ray Serve's rule would ask
    # 30 / 2 = 15 (here the max, 8).
    deep = (edge(1, high=8, outstanding=30.0, rps=5.0), cloud())
    assert policy.decide(ctx(0.0, *deep), R3eState())[0].targets == {EDGE: 5}
    # A shorter drain_s asks for more: 5 + 5.5 / 0.25 = 27 req/s, 3 replicas +1.
    quick = r3e(drain_s=0.25)
    queued = (edge(1, outstanding=6.0, rps=5.0), cloud())
    assert quick.decide(ctx(0.0, *queued), R3eState())[0].targets == {EDGE: 4}
    # Without any service time known, Ray Serve's rule: 6 in flight / 2 per replica = 3, +1.
    blind = (edge(1, outstanding=6.0, rps=5.0, service_ms=None), cloud(service_ms=None))
    decision, _ = policy.decide(ctx(0.0, *blind), R3eState())
    assert decision.targets == {EDGE: 4}
    assert decision.reasons[EDGE].startswith("6.0 calls in flight / 2 per replica needs 3")


def test_r3e_counts_calls_on_the_wire_as_busy_not_queued() -> None:
    # 20 req/s, 10 per replica: 1 on the edge, 1 on the cloud. The cloud's 100 ms round trip
    # keeps its 4 calls in flight busy (20 x 0.2 s): no queue, nothing to add.
    policy = r3e(spare=0, headroom=1.0)
    on_wire = (edge(1, high=1), cloud(1, outstanding=4.0, rps=20.0, link_ms=100.0))
    assert policy.decide(ctx(0.0, *on_wire), R3eState())[0].targets == {}
    # The same 4 calls on a replica next door: 2 of them wait, and draining them asks for one
    # more.
    local = (edge(1, high=1), cloud(1, outstanding=4.0, rps=20.0))
    decision, _ = policy.decide(ctx(0.0, *local), R3eState())
    assert decision.targets == {CLOUD: 2}
    assert decision.reasons[CLOUD].startswith("20.0 req/s + 2.0 queued / 1 s needs 3")


def test_r3e_keeps_warm_tiers_at_their_max_and_counts_them_as_the_spare() -> None:
    policy = r3e(warm_tiers=["edge"])
    # 5 req/s needs 1; the edge is held at its max (4) whatever the need, and those replicas
    # are the spare too: nothing goes to the cloud.
    decision, _ = policy.decide(ctx(0.0, edge(1, rps=5.0), cloud()), R3eState())
    assert decision.targets == {EDGE: 4}
    idle = (edge(4, rps=0.0), cloud())
    assert policy.decide(ctx(100.0, *idle), R3eState())[0].targets == {}
    # A step beyond the warm edge bursts to the cloud as before: 60 x 1.2 = 72 req/s needs 8,
    # 4 on the edge, 4 on the cloud; the edge's replicas beyond its need are gone, +1 spare.
    decision, _ = policy.decide(ctx(0.0, edge(4, rps=60.0), cloud()), R3eState())
    assert decision.targets == {CLOUD: 5}
    # A tier cap still wins over warmth (members sharing the edge are trimmed as before).
    capped = policy.decide(ctx(0.0, edge(1, rps=5.0), cloud(), caps={"edge": 2}), R3eState())
    assert capped[0].targets == {EDGE: 2}


def test_r3e_orders_unlisted_tiers_after_listed_ones_cheaper_first() -> None:
    policy = r3e(tier_order=["edge"])
    loads = (
        place("edge", 1, 1, 1, rps=25.0),
        place("pricey", 0, 0, 8, price=5.0),
        place("cheap", 0, 0, 8, price=1.0),
    )
    decision, _ = policy.decide(ctx(0.0, *loads), R3eState())
    assert decision.targets == {("m", "cheap"): 3}  # 30 req/s: 1 on the edge, 2 + spare


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("capacity", {"headroom": 0.5}, "headroom"),
        ("capacity", {"downscale_after": 0}, "downscale_after"),
        ("capacity", {"headrom": 1.5}, "headrom"),
        ("slo_feedback", {"error_budget": 0}, "error_budget"),
        ("slo_feedback", {"low_water": 1.5}, "low_water"),
        ("slo_feedback", {"p95_slo": 100}, "p95_slo"),
        ("r3e", {"spare": -1}, "spare"),
        ("r3e", {"max_cost_per_hour": -1}, "max_cost_per_hour"),
        ("r3e", {"tier_order": ["edge", "edge"]}, "twice"),
        ("r3e", {"warm_tiers": ["edge", "edge"]}, "twice"),
        ("r3e", {"scale_to_zero_s": 60}, "scale_to_zero_s"),
    ],
)
def test_params_validated_through_the_registry(
    name: str, params: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        registry.build("autoscaling", name, params, AutoscalingPolicy)


def test_r3e_sees_no_trend_in_a_flat_but_noisy_rate() -> None:
    policy = r3e(lookahead_s=5, trend_window_s=10, spare=0)
    state = R3eState()
    noisy = (60.0, 52.0, 66.0, 57.0, 63.0, 55.0, 68.0, 58.0, 61.0, 64.0)
    decision = None
    for t, rate in enumerate(noisy):
        decision, state = policy.decide(ctx(t * 0.5, edge(4, high=8, rps=rate), cloud()), state)
    assert decision is not None and "trending" not in decision.reasons.get(EDGE, "")
    # The same history with trend_min_t 0 (any rising slope) extrapolates the noise.
    eager, state = r3e(lookahead_s=5, trend_window_s=10, spare=0, trend_min_t=0), R3eState()
    for t, rate in enumerate(noisy):
        decision, state = eager.decide(ctx(t * 0.5, edge(4, high=8, rps=rate), cloud()), state)
    assert "trending" in decision.reasons[EDGE]


def test_r3e_discounts_overlapping_windows_before_it_sees_a_trend() -> None:
    # A slow rise sampled every 0.5 s: its slope is 5.4 standard errors above zero, a trend
    # at trend_min_t 3 when the samples are independent.
    rising = (50.0, 52.0, 49.0, 55.0, 53.0, 56.0, 54.0, 58.0, 57.0, 59.0)
    policy = r3e(lookahead_s=5, trend_window_s=10, spare=0)

    def reason(window_s: float) -> str:
        state, decision = R3eState(), None
        for t, rate in enumerate(rising):
            loads = (edge(4, high=8, rps=rate), cloud())
            context = ScalingContext(t * 0.5, loads, {}, window_s)
            decision, state = policy.decide(context, state)
        assert decision is not None
        return decision.reasons.get(EDGE, "")

    assert "trending" in reason(0.0)
    # The same samples as rates over 2 s windows: four samples a window share their calls,
    # so the slope's standard error doubles (2.7 of them) and the rise is not yet a trend.
    assert "trending" not in reason(2.0)
