"""Behaviour of each selection policy: all, static, cascade, slo_greedy, exp3, exp4, cocktail."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import (
    Contract,
    Feedback,
    MemberAnswer,
    MemberView,
    SelectionContext,
    ValidationSet,
)
from policies import registry
from policies.base import SelectionPolicy
from policies.ensemble_math import at_least_one_correct, subset_accuracy
from policies.selection_bandits import BanditState, exp4_weights


def build(name: str, **params: Any) -> Any:
    return registry.build("selection", name, params, SelectionPolicy)


def view(name: str, **kw: Any) -> MemberView:
    kw.setdefault("tiers", ("edge",))
    kw.setdefault("accuracy", 0.9)
    kw.setdefault("ready", True)
    return MemberView(name, **kw)


def ans(member: str, probs: list[list[float]]) -> MemberAnswer:
    return MemberAnswer(member, "edge", f"{member}/0", np.asarray(probs, dtype=np.float32), 0.01)


def onehot(classes: list[int], n_classes: int = 3, p: float = 0.9) -> np.ndarray:
    out = np.full((len(classes), n_classes), (1 - p) / (n_classes - 1), dtype=np.float32)
    out[np.arange(len(classes)), classes] = p
    return out


def random_validation(rng: np.random.Generator, names: list[str], n: int = 60) -> ValidationSet:
    labels = rng.integers(0, 4, size=n)
    probs = {m: rng.dirichlet(np.ones(4), size=n) for m in names}
    return ValidationSet(labels, probs)


def brute_force_accuracy(validation: ValidationSet, members: tuple[str, ...]) -> float:
    mean = np.mean([validation.probabilities[m] for m in members], axis=0)
    return float(np.mean(mean.argmax(axis=1) == validation.labels))


# all


def test_select_all_skips_unready_members() -> None:
    policy = build("all")
    members = (view("a", accuracy=None), view("b", tiers=("cloud",), accuracy=None, ready=False))
    chosen, _ = policy.select(SelectionContext("e", members, 1), (), None)
    assert chosen == ("a",)


# static


def test_static_asks_named_available_members_once() -> None:
    policy = build("static", members=["c", "a", "b"])
    members = (view("a"), view("b", ready=False), view("c"), view("d"))
    ctx = SelectionContext("e", members, 1)
    chosen, state = policy.select(ctx, (), None)
    assert chosen == ("c", "a")
    assert policy.select(ctx, (ans("c", [[1.0, 0.0]]),), state) == ((), None)
    assert policy.weights(state) is None


def test_static_honours_tier() -> None:
    policy = build("static", members=["a", "b"])
    members = (view("a", tiers=("cloud",)), view("b"))
    chosen, _ = policy.select(SelectionContext("e", members, 1, Contract(tier="edge")), (), None)
    assert chosen == ("b",)


# cascade

CASCADE_MEMBERS = (
    view("big", cost_per_call=1.0, latency_s=0.05),
    view("small", cost_per_call=0.1, latency_s=0.02),
    view("mid", cost_per_call=0.5, latency_s=0.01),
    view("mid_slow", cost_per_call=0.5, latency_s=0.03),
)


def test_cascade_starts_cheapest_and_escalates_below_threshold() -> None:
    policy = build("cascade", threshold=0.8)
    ctx = SelectionContext("e", CASCADE_MEMBERS, 1)
    assert policy.select(ctx, (), None)[0] == ("small",)
    unsure = (ans("small", [[0.6, 0.3, 0.1]]),)
    assert policy.select(ctx, unsure, None)[0] == ("mid",)
    still = (*unsure, ans("mid", [[0.7, 0.2, 0.1]]))  # mean top probability 0.65
    assert policy.select(ctx, still, None)[0] == ("mid_slow",)
    everyone = (*still, ans("mid_slow", [[0.5, 0.5, 0.0]]), ans("big", [[0.5, 0.5, 0.0]]))
    assert policy.select(ctx, everyone, None)[0] == ()


def test_cascade_fails_over_past_a_member_that_failed() -> None:
    policy = build("cascade", threshold=0.8)
    failed_first = SelectionContext("e", CASCADE_MEMBERS, 1, asked=("small",))
    assert policy.select(failed_first, (), None)[0] == ("mid",)
    unsure = (ans("mid", [[0.6, 0.3, 0.1]]),)
    failed_two = SelectionContext("e", CASCADE_MEMBERS, 1, asked=("small", "mid", "mid_slow"))
    assert policy.select(failed_two, unsure, None)[0] == ("big",)


def test_cascade_stops_when_confident() -> None:
    policy = build("cascade", threshold=0.8)
    ctx = SelectionContext("e", CASCADE_MEMBERS, 2)
    assert policy.select(ctx, (ans("small", [[0.9, 0.1], [0.05, 0.95]]),), None)[0] == ()
    # one unsure row in the batch is enough to escalate
    assert policy.select(ctx, (ans("small", [[0.9, 0.1], [0.4, 0.6]]),), None)[0] == ("mid",)


def test_cascade_per_class_thresholds() -> None:
    policy = build("cascade", threshold=0.8, per_class={1: 0.95})
    ctx = SelectionContext("e", CASCADE_MEMBERS, 1)
    assert policy.select(ctx, (ans("small", [[0.9, 0.1]]),), None)[0] == ()
    assert policy.select(ctx, (ans("small", [[0.1, 0.9]]),), None)[0] == ("mid",)
    assert policy.select(ctx, (ans("small", [[0.02, 0.98]]),), None)[0] == ()


def test_cascade_explicit_order_skips_unavailable_and_resumes_after_furthest() -> None:
    members = (*CASCADE_MEMBERS[:3], view("mid_slow", ready=False))
    policy = build("cascade", threshold=0.99, order=["big", "mid_slow", "mid", "small"])
    ctx = SelectionContext("e", members, 1)
    assert policy.select(ctx, (), None)[0] == ("big",)
    # mid_slow is not ready, so mid is next; after mid answered, small
    assert policy.select(ctx, (ans("big", [[0.5, 0.5]]),), None)[0] == ("mid",)
    assert policy.select(ctx, (ans("mid", [[0.5, 0.5]]),), None)[0] == ("small",)


# slo_greedy


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 4))
def test_subset_accuracy_matches_brute_force(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]
    validation = random_validation(rng, names)
    for subset in itertools.combinations(names, size):
        expected = brute_force_accuracy(validation, subset)
        assert subset_accuracy(validation, subset) == pytest.approx(expected)
        assert subset_accuracy(validation, reversed(subset)) == pytest.approx(expected)


def test_rohe_bound() -> None:
    assert at_least_one_correct([0.9, 0.8]) == pytest.approx(1 - 0.1 * 0.2)
    assert at_least_one_correct([]) == 0.0


def test_slo_greedy_picks_most_accurate_subset_under_budget() -> None:
    rng = np.random.default_rng(7)
    names = ["a", "b", "c", "d", "e"]
    validation = random_validation(rng, names, n=200)
    costs = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5}
    members = tuple(view(n, cost_per_call=costs[n], latency_s=0.01) for n in names)
    for budget in (0.1, 0.35, 0.6, 1.0, 2.0):
        ctx = SelectionContext("e", members, 1, Contract(max_cost=budget), validation=validation)
        chosen, _ = build("slo_greedy").select(ctx, (), None)
        best = max(
            brute_force_accuracy(validation, s)
            for k in range(1, 6)
            for s in itertools.combinations(names, k)
            if sum(costs[m] for m in s) <= budget + 1e-9
        )
        assert sum(costs[m] for m in chosen) <= budget + 1e-9
        assert brute_force_accuracy(validation, chosen) == pytest.approx(best)


def test_slo_greedy_respects_deadline_with_safety_factor() -> None:
    members = (
        view("fast", accuracy=0.8, latency_s=0.010),
        view("slow", accuracy=0.95, latency_s=0.090),
    )
    policy = build("slo_greedy", safety_factor=1.2)

    def pick(remaining_s: float | None) -> tuple[str, ...]:
        ctx = SelectionContext("e", members, 1, remaining_s=remaining_s)
        chosen: tuple[str, ...] = policy.select(ctx, (), None)[0]
        return chosen

    assert pick(None) == ("slow",)
    assert pick(0.2) == ("slow",)
    assert pick(0.1) == ("fast",)  # 0.09 * 1.2 > 0.1
    assert pick(0.001) == ("fast",)  # nothing fits: the cheapest, then fastest member


def test_slo_greedy_fallbacks_without_validation() -> None:
    members = (view("a", accuracy=0.8), view("b", accuracy=0.7), view("c", accuracy=None))
    ctx = SelectionContext("e", members, 1)
    assert build("slo_greedy").select(ctx, (), None)[0] == ("a",)
    rohe = build("slo_greedy", fallback_accuracy="at_least_one")
    assert set(rohe.select(ctx, (), None)[0]) == {"a", "b"}  # c adds nothing to the bound


def test_slo_greedy_prefer_cost_meets_min_accuracy_cheaply() -> None:
    members = (
        view("cheap", accuracy=0.85, cost_per_call=0.1),
        view("dear", accuracy=0.95, cost_per_call=1.0),
    )
    policy = build("slo_greedy", prefer="cost")
    ctx = SelectionContext("e", members, 1, Contract(min_accuracy=0.8))
    assert policy.select(ctx, (), None)[0] == ("cheap",)
    ctx = SelectionContext("e", members, 1, Contract(min_accuracy=0.9))
    assert policy.select(ctx, (), None)[0] == ("dear",)
    ctx = SelectionContext("e", members, 1, Contract(min_accuracy=0.99))
    assert policy.select(ctx, (), None)[0] == ("dear",)  # none meets it: the best available


def test_slo_greedy_greedy_beyond_exact_limit_stays_feasible() -> None:
    rng = np.random.default_rng(3)
    names = [f"m{i}" for i in range(6)]
    validation = random_validation(rng, names, n=300)
    members = tuple(view(n, cost_per_call=0.25, latency_s=0.01) for n in names)
    ctx = SelectionContext("e", members, 1, Contract(max_cost=0.8), validation=validation)
    chosen, _ = build("slo_greedy", exact_limit=2).select(ctx, (), None)
    assert 1 <= len(chosen) <= 3
    singles = max(brute_force_accuracy(validation, (n,)) for n in names)
    assert brute_force_accuracy(validation, chosen) >= singles


@settings(max_examples=80, deadline=None)
@given(
    costs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=7),
    accuracies=st.lists(st.none() | st.floats(0.0, 1.0), min_size=7, max_size=7),
    budget=st.floats(0.0, 3.0),
    with_validation=st.booleans(),
)
def test_slo_greedy_never_exceeds_a_feasible_budget(
    costs: list[float], accuracies: list[float | None], budget: float, with_validation: bool
) -> None:
    names = [f"m{i}" for i in range(len(costs))]
    members = tuple(
        view(n, cost_per_call=c, accuracy=a)
        for n, c, a in zip(names, costs, accuracies[: len(names)], strict=True)
    )
    validation = random_validation(np.random.default_rng(0), names) if with_validation else None
    ctx = SelectionContext("e", members, 1, Contract(max_cost=budget), validation=validation)
    chosen, _ = build("slo_greedy").select(ctx, (), None)
    assert chosen
    if min(costs) <= budget:
        assert sum(costs[names.index(m)] for m in chosen) <= budget + 1e-9


# exp3


def simulate_bandit(policy: Any, rounds: int, good: str = "good") -> tuple[Any, list[str]]:
    members = (view("good"), view("bad"), view("meh"))
    ctx = SelectionContext("e", members, 1)
    state = policy.initial_state()
    picks: list[str] = []
    for i in range(rounds):
        chosen, state = policy.select(ctx, (), state)
        label = i % 3
        answers = {m: onehot([label if m == good else (label + 1) % 3]) for m in chosen}
        state = policy.feedback(
            Feedback.from_probabilities("e", str(i), np.array([label]), answers, chosen), state
        )
        picks.extend(chosen)
    return state, picks


def test_exp3_weights_move_toward_the_better_member() -> None:
    policy = build("exp3", seed=1)
    state, picks = simulate_bandit(policy, 1500)
    assert state.weights["good"] > 10 * state.weights["bad"]
    assert state.weights["good"] > 10 * state.weights["meh"]
    assert picks[-300:].count("good") > 240
    assert policy.weights(state) is None  # one member per request: nothing to weigh


def test_exp3_is_deterministic_given_state_and_asks_once() -> None:
    policy = build("exp3", seed=42)
    ctx = SelectionContext("e", (view("a"), view("b"), view("c")), 1)
    state = BanditState({"a": 1.0, "b": 0.5, "c": 0.25}, draws=17)
    first = policy.select(ctx, (), state)
    assert first == policy.select(ctx, (), state)
    assert len(first[0]) == 1 and first[1].draws == 18
    assert policy.select(ctx, (ans(first[0][0], [[1.0, 0.0]]),), first[1])[0] == ()


def test_exp3_update_rule_and_new_member_at_mean_weight() -> None:
    policy = build("exp3", eta=0.5)
    state = BanditState({"a": 1.0, "b": 0.5})
    event = Feedback.from_probabilities("e", "r", np.array([0]), {"b": onehot([1])}, ("b",))
    after = policy.feedback(event, state)
    p_b = 0.5 / 1.5
    assert after.weights["b"] == pytest.approx(0.5 * math.exp(-0.5 / p_b))
    assert after.weights["a"] == pytest.approx(1.0)
    ctx = SelectionContext("e", (view("a"), view("b"), view("new")), 1)
    _, grown = policy.select(ctx, (), after)
    assert grown.weights["new"] == pytest.approx((1.0 + after.weights["b"]) / 2)


@pytest.mark.parametrize("name", ["exp3", "exp4"])
@settings(max_examples=40, deadline=None)
@given(
    eta=st.floats(0.001, 10.0),
    losses=st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=60),
)
def test_bandit_weights_stay_positive_and_finite(
    name: str, eta: float, losses: list[tuple[str, bool]]
) -> None:
    policy = build(name, eta=eta)
    state = policy.initial_state()
    ctx = SelectionContext("e", (view("a"), view("b"), view("c")), 1)
    for i, (member, wrong) in enumerate(losses):
        _, state = policy.select(ctx, (), state)
        answers = {member: onehot([1 if wrong else 0])}
        state = policy.feedback(
            Feedback.from_probabilities("e", str(i), np.array([0]), answers, (member,)), state
        )
        assert all(math.isfinite(w) and w > 0 for w in state.weights.values())
    learned = exp4_weights(state)
    assert all(math.isfinite(w) and w > 0 for w in learned.values())
    assert sum(learned.values()) == pytest.approx(1.0)


# exp4


def test_exp4_asks_all_and_learns_weights() -> None:
    policy = build("exp4", eta=0.1)
    members = (view("good"), view("bad"), view("meh"), view("off", ready=False))
    ctx = SelectionContext("e", members, 1)
    chosen, state = policy.select(ctx, (), policy.initial_state())
    assert chosen == ("good", "bad", "meh")
    assert policy.weights(state) == pytest.approx({"good": 1 / 3, "bad": 1 / 3, "meh": 1 / 3})
    event = Feedback.from_probabilities(
        "e",
        "r",
        np.array([0, 1]),
        {"good": onehot([0, 1]), "bad": onehot([2, 2]), "meh": onehot([0, 2])},
        chosen,
    )
    state = policy.feedback(event, state)
    assert state.weights["good"] == pytest.approx(1.0)
    assert state.weights["bad"] == pytest.approx(math.exp(-0.1))
    assert state.weights["meh"] == pytest.approx(math.exp(-0.05))
    assert policy.weights(state) == pytest.approx(exp4_weights(state))
    state, _ = simulate_bandit(policy, 300)
    w = policy.weights(state)
    assert w is not None and w["good"] > w["meh"] and w["good"] > w["bad"]


# cocktail


def cocktail_round(
    policy: Any, ctx: SelectionContext, state: Any, wrong: dict[str, float], i: int
) -> Any:
    """One request and its feedback; member m is wrong on a share wrong[m] of requests."""
    chosen, state = policy.select(ctx, (), state)
    label = i % 3
    answers = {
        m: onehot([(label + 1) % 3 if (i * 7919 % 100) < 100 * wrong.get(m, 0.0) else label])
        for m in chosen
    }
    return policy.feedback(
        Feedback.from_probabilities("e", str(i), np.array([label]), answers, chosen), state
    )


COCKTAIL_MEMBERS = tuple(view(f"m{i}", accuracy=0.95 - i / 100) for i in range(5))


def test_cocktail_shrinks_on_a_high_accuracy_window() -> None:
    policy = build("cocktail", target_accuracy=0.9, window=10, cooldown_windows=0)
    ctx = SelectionContext("e", COCKTAIL_MEMBERS, 1)
    state = policy.initial_state()
    wrong = {"m3": 0.3, "m4": 0.5}
    for i in range(10):
        state = cocktail_round(policy, ctx, state, wrong, i)
    # 5 voters, quorum 3; the median winner has 4 or 5 votes: margin >= 1
    assert state.active is not None and len(state.active) < 5
    assert "m4" not in state.active
    assert set(state.active) <= {m.name for m in COCKTAIL_MEMBERS}


def test_cocktail_grows_on_a_low_accuracy_window_and_keeps_min_members() -> None:
    policy = build("cocktail", target_accuracy=0.9, window=5, initial_members=2, cooldown_windows=0)
    ctx = SelectionContext("e", COCKTAIL_MEMBERS, 1)
    state = policy.initial_state()
    assert policy.select(ctx, (), state)[0] == ("m0", "m1")
    for i in range(5):
        state = cocktail_round(policy, ctx, state, {"m0": 1.0, "m1": 1.0}, i)
    assert state.active == ("m0", "m1", "m2")

    shrinking = build("cocktail", target_accuracy=0.5, window=2, min_members=4)
    state = shrinking.initial_state()
    for i in range(20):
        state = cocktail_round(shrinking, ctx, state, {}, i)
    assert state.active is not None and len(state.active) == 4


def test_cocktail_hysteresis_holds_off_resizing_during_cooldown() -> None:
    policy = build("cocktail", target_accuracy=0.9, window=5, initial_members=1, cooldown_windows=2)
    ctx = SelectionContext("e", COCKTAIL_MEMBERS, 1)
    state = policy.initial_state()
    sizes = []
    for i in range(25):
        state = cocktail_round(policy, ctx, state, {m.name: 1.0 for m in COCKTAIL_MEMBERS}, i)
        if (i + 1) % 5 == 0:
            sizes.append(len(state.active or ()))
    # grow, hold two windows, grow again, hold
    assert sizes == [2, 2, 2, 3, 3]
    w = policy.weights(state)
    assert w is not None and sum(w.values()) == pytest.approx(1.0)
