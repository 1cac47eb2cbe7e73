"""Selection on live placements: members and tiers chosen together by what fits the time left
(slo_greedy, cascade, cocktail), the card-based behaviour kept behind `estimates: card`, and
routing honouring the tier chosen."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from ensemble.replicas.member import Member
from ensemble.types import (
    Contract,
    MemberAnswer,
    MemberView,
    Pick,
    PlacementView,
    RoutingContext,
    SelectionContext,
    TensorSpec,
)
from policies import registry
from policies.base import RoutingPolicy, SelectionPolicy
from policies.selection import placement_for


def build(name: str, **params: Any) -> Any:
    return registry.build("selection", name, params, SelectionPolicy)


def at(tier: str, p50_ms: float, p95_ms: float, cost: float = 0.0, **kw: Any) -> PlacementView:
    kw.setdefault("ready", True)
    return PlacementView(
        tier,
        latency_s=p50_ms / 1e3,
        latency_p95_s=p95_ms / 1e3,
        latency_p99_s=p95_ms / 1e3,
        round_trip_s=0.0,
        cost_per_call=cost,
        samples=20,
        **kw,
    )


def member(name: str, accuracy: float, *placements: PlacementView, **kw: Any) -> MemberView:
    """A member whose card says it is fast (0.1 ms) and free: only the live figures differ."""
    tiers = tuple(p.tier for p in placements)
    return MemberView(name, tiers, accuracy, True, latency_s=1e-4, placements=placements, **kw)


def ctx(members: tuple[MemberView, ...], remaining_ms: float | None, **kw: Any) -> SelectionContext:
    left = None if remaining_ms is None else remaining_ms / 1e3
    return SelectionContext("e", members, 1, remaining_s=left, **kw)


# The ensemble: logreg on the edge, svm and mlp_large behind a 40 ms round trip.
EDGE_AND_CLOUD = (
    member("logreg", 0.95, at("edge", 0.5, 1.0)),
    member("svm", 0.97, at("cloud", 41.0, 43.0)),
    member("mlp_large", 0.96, at("cloud", 41.0, 44.0)),
)


def test_slo_greedy_leaves_out_what_cannot_answer_in_time() -> None:
    chosen, _ = build("slo_greedy").select(ctx(EDGE_AND_CLOUD, 15), (), None)
    assert chosen == (Pick("logreg", "edge"),)
    roomy, _ = build("slo_greedy").select(ctx(EDGE_AND_CLOUD, 100), (), None)
    assert roomy == (Pick("svm", "cloud"),)  # the most accurate (by card) when all fit


def test_slo_greedy_on_card_estimates_is_blind_to_the_link() -> None:
    chosen, _ = build("slo_greedy", estimates="card").select(ctx(EDGE_AND_CLOUD, 15), (), None)
    assert chosen == ("svm",)  # the old behaviour: the card says 0.1 ms


def test_slo_greedy_takes_the_cheapest_tier_that_fits() -> None:
    both = member("m", 0.9, at("edge", 8.0, 12.0, cost=1.0), at("cloud", 3.0, 5.0, cost=2.0))
    assert build("slo_greedy").select(ctx((both,), 20), (), None)[0] == (Pick("m", "edge"),)
    # 12 ms x 1.2 (the safety factor) is more than 14 ms: only the cloud fits
    assert build("slo_greedy").select(ctx((both,), 14), (), None)[0] == (Pick("m", "cloud"),)
    # the tail decides: by p50 the edge would fit
    p50 = build("slo_greedy", tail="p50", safety_factor=1.0)
    assert p50.select(ctx((both,), 9), (), None)[0] == (Pick("m", "edge"),)


def test_slo_greedy_counts_the_chosen_tiers_price_against_the_budget() -> None:
    both = member("m", 0.9, at("edge", 8.0, 12.0, cost=1.0), at("cloud", 3.0, 5.0, cost=2.0))
    other = member("o", 0.8, at("edge", 1.0, 2.0, cost=0.5))
    c = ctx((both, other), 14, contract=Contract(max_cost=1.9))
    # m fits only on the cloud (2.0), over the budget: o alone
    assert build("slo_greedy").select(c, (), None)[0] == (Pick("o", "edge"),)


def test_placement_for_honours_readiness_the_contracts_tier_and_failures() -> None:
    view = member(
        "m",
        0.9,
        at("edge", 1.0, 2.0, cost=0.0, error_rate=0.4),
        at("cloud", 5.0, 6.0, cost=1.0),
        at("far", 2.0, 3.0, cost=0.0, ready=False),
    )
    assert placement_for(view, ctx((view,), 50)).tier == "cloud"  # edge fails 40% of calls
    only_edge = ctx((view,), 50, contract=Contract(tier="edge"))
    assert placement_for(view, only_edge).tier == "edge"
    none_fits = placement_for(view, ctx((view,), 0.5))
    assert none_fits is not None and none_fits.tier == "edge"  # the fastest
    assert placement_for(MemberView("x", ("edge",), 0.9, True), ctx((), 5)) is None


def answer(name: str, p: float) -> MemberAnswer:
    probs = np.asarray([[p, 1 - p]], dtype=np.float32)
    return MemberAnswer(name, "edge", f"{name}/0", probs, 0.001)


def test_cascade_starts_where_it_is_cheapest_then_fastest_now() -> None:
    # Equal prices: the edge member goes first because it is faster now, whatever its card says.
    members = (
        member("cloudy", 0.9, at("cloud", 41.0, 43.0)),
        member("local", 0.9, at("edge", 2.0, 3.0)),
    )
    policy = build("cascade", threshold=0.9)
    c = ctx(members, 100)
    assert policy.select(c, (), None)[0] == (Pick("local", "edge"),)
    unsure = (answer("local", 0.6),)
    asked = ctx(members, 100, asked=("local",))
    assert policy.select(asked, unsure, None)[0] == (Pick("cloudy", "cloud"),)
    # with 20 ms left the cloud cannot answer in time: stop with what there is
    late = ctx(members, 20, asked=("local",))
    assert policy.select(late, unsure, None)[0] == ()
    assert build("cascade", estimates="card").select(c, (), None)[0] == ("cloudy",)


def test_cascade_asks_the_fastest_first_stage_when_nothing_fits() -> None:
    members = (member("a", 0.9, at("cloud", 41.0, 43.0)), member("b", 0.9, at("cloud", 50, 60)))
    assert build("cascade").select(ctx(members, 5), (), None)[0] == (Pick("a", "cloud"),)


def test_cocktail_asks_active_members_where_they_fit_and_leaves_out_the_rest() -> None:
    policy = build("cocktail")
    chosen, _ = policy.select(ctx(EDGE_AND_CLOUD, 15), (), policy.initial_state())
    assert chosen == (Pick("logreg", "edge"),)
    chosen, _ = policy.select(ctx(EDGE_AND_CLOUD, 100), (), policy.initial_state())
    assert set(chosen) == {Pick("logreg", "edge"), Pick("svm", "cloud"), Pick("mlp_large", "cloud")}
    card = build("cocktail", estimates="card")
    chosen, _ = card.select(ctx(EDGE_AND_CLOUD, 15), (), card.initial_state())
    assert set(chosen) == {"logreg", "svm", "mlp_large"}


class Named:
    def __init__(self, name: str, tier: str) -> None:
        self.name, self.tier = name, tier

    def ready(self) -> bool:
        return True


@pytest.mark.parametrize("prefer", ["edge", "cloud"])
def test_routing_puts_the_chosen_tiers_replicas_first(prefer: str) -> None:
    spec = (TensorSpec("input", "FP32", (-1, 4)),)
    replicas = [Named("edge/0", "edge"), Named("cloud/0", "cloud"), Named("edge/1", "edge")]
    m = Member("m", spec, spec, None, replicas)  # type: ignore[arg-type]
    routing = registry.build("routing", "round_robin", None, RoutingPolicy)
    order = m.route(routing, RoutingContext("m"), random.Random(0), prefer=prefer)
    tiers = [r.tier for r in order]
    assert tiers == sorted(tiers, key=lambda t: t != prefer) and len(order) == 3
