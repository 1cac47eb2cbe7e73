"""Conformance of every registered selection and aggregation policy, plus their properties."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from ensemble.types import (
    AggregationContext,
    Contract,
    Feedback,
    MemberAnswer,
    MemberView,
    SelectionContext,
)
from policies import registry
from policies.base import AggregationPolicy, SelectionPolicy
from policies.selection import allowed

AGGREGATIONS = registry.names("aggregation")
SELECTIONS = registry.names("selection")

CONFORMANCE_PARAMS: dict[str, dict[str, Any]] = {"static": {"members": ["m0", "m2", "m4"]}}
"""Params for policies that have no usable defaults; every other one runs with defaults."""


def answer(probs: list[list[float]], member: str = "m") -> MemberAnswer:
    return MemberAnswer(member, "edge", "edge/0", np.asarray(probs, dtype=np.float32), 0.001)


def selection(name: str) -> Any:
    return registry.build("selection", name, CONFORMANCE_PARAMS.get(name), SelectionPolicy)


def aggregation(name: str) -> Any:
    return registry.build("aggregation", name, CONFORMANCE_PARAMS.get(name), AggregationPolicy)


def run_request(
    policy: Any, ctx: SelectionContext, state: Any, probs: np.ndarray, max_stages: int = 20
) -> tuple[list[tuple[str, ...]], Any]:
    """Drive one request to its end the way the runtime does; returns every stage's choice."""
    answers: list[MemberAnswer] = []
    stages: list[tuple[str, ...]] = []
    for _ in range(max_stages):
        chosen, state = policy.select(ctx, tuple(answers), state)
        if not chosen:
            return stages, state
        stages.append(chosen)
        answers.extend(MemberAnswer(m, "edge", f"{m}/0", probs, 0.001) for m in chosen)
    raise AssertionError(f"no end after {max_stages} stages: {stages}")


def check_weights(weights: Mapping[str, float] | None) -> None:
    if weights is not None:
        assert all(math.isfinite(w) and w > 0 for w in weights.values()), weights


def test_builtins_registered() -> None:
    assert {"mean_probability", "majority_vote", "weighted_vote", "max_confidence"} <= set(
        AGGREGATIONS
    )
    assert {"all", "static", "cascade", "slo_greedy", "exp3", "exp4", "cocktail"} <= set(SELECTIONS)


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register("selection", "all")(object)


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(KeyError, match=r"registered: .*all"):
        registry.lookup("selection", "nope")


@pytest.mark.parametrize("name", SELECTIONS)
def test_selection_params_forbid_unknown_keys_and_describe_fields(name: str) -> None:
    entry = registry.lookup("selection", name)
    assert issubclass(entry.params_model, BaseModel)
    with pytest.raises(ValidationError):
        entry.build({**CONFORMANCE_PARAMS.get(name, {}), "unexpected": 1})
    for field_name, info in entry.params_model.model_fields.items():
        assert info.description, f"{name}: param {field_name} has no description"
    assert entry.summary, f"{name} has no docstring summary"


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregation_params_forbid_unknown_keys(name: str) -> None:
    entry = registry.lookup("aggregation", name)
    with pytest.raises(ValidationError):
        entry.build({**CONFORMANCE_PARAMS.get(name, {}), "unexpected": 1})
    for field_name, info in entry.params_model.model_fields.items():
        assert info.description, f"{name}: param {field_name} has no description"


@pytest.mark.parametrize("name", SELECTIONS)
def test_selection_conformance(name: str) -> None:
    policy = selection(name)
    members = tuple(
        MemberView(f"m{i}", ("edge",), 0.8 + i / 100, True, cost_per_call=0.1, latency_s=0.01)
        for i in range(5)
    )
    ctx = SelectionContext("e", members, 2)
    state = policy.initial_state()
    probs = np.asarray([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]], dtype=np.float32)
    stages, state = run_request(policy, ctx, state, probs)
    asked = [m for stage in stages for m in stage]
    assert asked, f"{name} asked nobody"
    assert len(set(asked)) == len(asked)
    assert set(asked) <= set(allowed(ctx))
    event = Feedback.from_probabilities(
        "e", "r1", np.array([0, 1]), {m: probs for m in asked}, tuple(asked)
    )
    state = policy.feedback(event, state)
    check_weights(policy.weights(state))
    # A second request after feedback still works from the returned state.
    stages, state = run_request(policy, ctx, state, probs)
    assert stages


@pytest.mark.parametrize("name", SELECTIONS)
def test_selection_with_no_member_available_asks_nobody_allowed(name: str) -> None:
    policy = selection(name)
    members = (MemberView("m0", ("cloud",), 0.9, True), MemberView("m2", ("edge",), 0.9, False))
    ctx = SelectionContext("e", members, 1, Contract(tier="edge"))
    chosen, _ = policy.select(ctx, (), policy.initial_state())
    assert "m0" not in chosen, "data left the tier the contract allows"


def test_select_all_skips_unready_members() -> None:
    policy = selection("all")
    members = (MemberView("a", ("edge",), None, True), MemberView("b", ("cloud",), None, False))
    chosen, _ = policy.select(SelectionContext("e", members, 1), (), None)
    assert chosen == ("a",)


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
def test_selection_never_repeats_nor_leaves_allowed(
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
        if ok:
            assert set(asked) <= ok, (stages, ok)
        if asked:
            event = Feedback.from_probabilities(
                "e", f"r{i}", np.array([i % 3]), dict.fromkeys(asked, probs), ()
            )
            state = policy.feedback(event, state)
            check_weights(policy.weights(state))


THREE = [
    answer([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "a"),
    answer([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], "b"),
    answer([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]], "c"),
]


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregation_conformance(name: str) -> None:
    policy = aggregation(name)
    ctx = AggregationContext(3)
    agg = policy.aggregate(THREE, ctx)
    assert agg.probabilities.shape == (2, 3)
    assert agg.class_index.tolist() == [0, 2]
    assert agg.confidence.shape == (2,)
    assert np.all((agg.confidence >= 0) & (agg.confidence <= 1))
    assert np.allclose(agg.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # partial results: any non-empty subset still aggregates
    assert policy.aggregate(THREE[:1], ctx).class_index.tolist() == [0, 2]
    assert policy.aggregate(THREE[1:], ctx).class_index.shape == (2,)
    with pytest.raises(ValueError):
        policy.aggregate([], ctx)
    with pytest.raises(ValueError):
        policy.aggregate(THREE, AggregationContext(4))


probability_rows = st.lists(
    st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4), min_size=1, max_size=5
).map(lambda rows: (np.asarray(rows) / np.asarray(rows).sum(axis=1, keepdims=True)).tolist())
member_knowledge = st.builds(
    MemberView,
    name=st.just("x"),
    tiers=st.just(("edge",)),
    accuracy=st.none() | st.floats(0.0, 1.0),
    ready=st.just(True),
    per_class_accuracy=st.none() | st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4).map(tuple),
    rolling_accuracy=st.none() | st.floats(0.0, 1.0),
)


@pytest.mark.parametrize("name", AGGREGATIONS)
@settings(max_examples=50, deadline=None)
@given(
    rows=probability_rows,
    copies=st.integers(1, 5),
    views=st.lists(member_knowledge, min_size=5, max_size=5),
    weights=st.none() | st.lists(st.floats(0.0, 10.0), min_size=5, max_size=5),
)
def test_identical_answers_return_that_answer(
    name: str,
    rows: list[list[float]],
    copies: int,
    views: list[MemberView],
    weights: list[float] | None,
) -> None:
    policy = aggregation(name)
    members = {f"m{i}": v for i, v in enumerate(views)}
    learned = None if weights is None else {f"m{i}": w for i, w in enumerate(weights)}
    ctx = AggregationContext(4, members, learned)
    agg = policy.aggregate([answer(rows, f"m{i}") for i in range(copies)], ctx)
    assert agg.class_index.tolist() == np.asarray(rows, dtype=np.float32).argmax(axis=1).tolist()
    assert np.all((agg.confidence >= 0) & (agg.confidence <= 1 + 1e-6))


def test_majority_vote_tie_broken_by_probability() -> None:
    policy = aggregation("majority_vote")
    ctx = AggregationContext(2)
    agg = policy.aggregate([answer([[0.9, 0.1]], "a"), answer([[0.4, 0.6]], "b")], ctx)
    assert agg.class_index.tolist() == [0]
    assert agg.confidence.tolist() == [0.5]
