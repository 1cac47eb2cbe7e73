"""Every registered selection policy: asks each member at most once, stays within the members the
contract allows, ends every request, and is deterministic given its state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import Contract, Feedback, MemberAnswer, MemberView, SelectionContext
from policies import registry
from policies.base import SelectionPolicy
from policies.selection import allowed
from tests.conformance.registered import build, check_entry

SELECTIONS = registry.names("selection")
PROBS = np.asarray([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]], dtype=np.float32)


def selection(name: str) -> Any:
    return build("selection", name, SelectionPolicy)


def five_members() -> tuple[MemberView, ...]:
    return tuple(
        MemberView(f"m{i}", ("edge",), 0.8 + i / 100, True, cost_per_call=0.1, latency_s=0.01)
        for i in range(5)
    )


def run_request(
    policy: Any, ctx: SelectionContext, state: Any, probs: np.ndarray
) -> tuple[list[tuple[str, ...]], Any]:
    """Drive one request to its end the way the runtime does; returns every stage's choice.

    A policy that never repeats a member can name at most one stage per member, so a request
    still going after that many stages does not end.
    """
    answers: list[MemberAnswer] = []
    stages: list[tuple[str, ...]] = []
    for _ in range(len(ctx.members) + 1):
        chosen, state = policy.select(ctx, tuple(answers), state)
        if not chosen:
            return stages, state
        stages.append(chosen)
        answers.extend(MemberAnswer(m, "edge", f"{m}/0", probs, 0.001) for m in chosen)
    raise AssertionError(f"no end after {len(ctx.members) + 1} stages: {stages}")


def check_weights(weights: Mapping[str, float] | None) -> None:
    if weights is not None:
        assert all(math.isfinite(w) and w > 0 for w in weights.values()), weights


def test_builtins_registered() -> None:
    assert {"all", "static", "cascade", "slo_greedy", "exp3", "exp4", "cocktail"} <= set(SELECTIONS)


@pytest.mark.parametrize("name", SELECTIONS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("selection", name)


@pytest.mark.parametrize("name", SELECTIONS)
def test_serves_a_request_learns_and_serves_another(name: str) -> None:
    policy = selection(name)
    ctx = SelectionContext("e", five_members(), 2)
    stages, state = run_request(policy, ctx, policy.initial_state(), PROBS)
    asked = [m for stage in stages for m in stage]
    assert asked, f"{name} asked nobody"
    assert len(set(asked)) == len(asked)
    assert set(asked) <= set(allowed(ctx))
    event = Feedback.from_probabilities(
        "e", "r1", np.array([0, 1]), {m: PROBS for m in asked}, tuple(asked)
    )
    state = policy.feedback(event, state)
    check_weights(policy.weights(state))
    # A second request after feedback still works from the returned state.
    stages, state = run_request(policy, ctx, state, PROBS)
    assert stages


@pytest.mark.parametrize("name", SELECTIONS)
def test_no_member_on_an_allowed_tier_means_no_data_leaves_the_tier(name: str) -> None:
    policy = selection(name)
    members = (MemberView("m0", ("cloud",), 0.9, True), MemberView("m2", ("edge",), 0.9, False))
    ctx = SelectionContext("e", members, 1, Contract(tier="edge"))
    chosen, _ = policy.select(ctx, (), policy.initial_state())
    assert "m0" not in chosen, "data left the tier the contract allows"


@pytest.mark.parametrize("name", SELECTIONS)
def test_never_names_a_member_the_request_already_asked(name: str) -> None:
    """``ctx.asked`` holds members asked earlier in the request (a failed one has no answer)."""
    policy = selection(name)
    ctx = SelectionContext("e", five_members(), 1, asked=("m0", "m2", "m4"))
    stages, _ = run_request(policy, ctx, policy.initial_state(), PROBS)
    asked = {m for stage in stages for m in stage}
    assert not asked & {"m0", "m2", "m4"}, stages


@pytest.mark.parametrize("name", SELECTIONS)
def test_same_state_and_inputs_give_the_same_choices(name: str) -> None:
    first, second = selection(name), selection(name)
    ctx = SelectionContext("e", five_members(), 2)
    state_a, state_b = first.initial_state(), second.initial_state()
    for i in range(3):
        stages_a, state_a = run_request(first, ctx, state_a, PROBS)
        stages_b, state_b = run_request(second, ctx, state_b, PROBS)
        assert stages_a == stages_b, i
        asked = tuple(m for stage in stages_a for m in stage)
        event = Feedback.from_probabilities(
            "e", f"r{i}", np.array([i % 3, 1]), dict.fromkeys(asked, PROBS), asked
        )
        state_a, state_b = first.feedback(event, state_a), second.feedback(event, state_b)
    assert first.weights(state_a) == second.weights(state_b)


member_views = st.lists(
    st.builds(
        MemberView,
        name=st.sampled_from([f"m{i}" for i in range(7)]),
        tiers=st.sampled_from([("edge",), ("cloud",), ("edge", "cloud")]),
        accuracy=st.none() | st.floats(0.0, 1.0),
        ready=st.booleans(),
        cost_per_call=st.floats(0.0, 1.0),
        latency_s=st.none() | st.floats(0.0, 0.5),
    ),
    min_size=1,
    max_size=7,
    unique_by=lambda m: m.name,
)
contracts = st.builds(
    Contract,
    tier=st.none() | st.sampled_from(["edge", "cloud"]),
    max_cost=st.none() | st.floats(0.0, 3.0),
    min_accuracy=st.none() | st.floats(0.0, 1.0),
)


@pytest.mark.parametrize("name", SELECTIONS)
@settings(max_examples=60, deadline=None)
@given(
    members=member_views,
    contract=contracts,
    remaining_s=st.none() | st.floats(0.0, 1.0),
    confidence=st.floats(0.34, 1.0),
    requests=st.integers(1, 3),
)
def test_never_repeats_nor_leaves_allowed_and_always_ends(
    name: str,
    members: list[MemberView],
    contract: Contract,
    remaining_s: float | None,
    confidence: float,
    requests: int,
) -> None:
    policy = selection(name)
    ctx = SelectionContext("e", tuple(members), 1, contract, remaining_s)
    ok = set(allowed(ctx))
    rest = (1.0 - confidence) / 2
    probs = np.asarray([[confidence, rest, rest]], dtype=np.float32)
    state = policy.initial_state()
    for i in range(requests):
        stages, state = run_request(policy, ctx, state, probs)
        asked = [m for stage in stages for m in stage]
        assert len(set(asked)) == len(asked), stages
        assert set(asked) <= {m.name for m in members}, stages
        if ok:
            assert set(asked) <= ok, (stages, ok)
        if asked:
            event = Feedback.from_probabilities(
                "e", f"r{i}", np.array([i % 3]), dict.fromkeys(asked, probs), ()
            )
            state = policy.feedback(event, state)
            check_weights(policy.weights(state))
