"""Conformance of every registered selection and aggregation policy, plus their properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from ensemble.types import MemberAnswer, MemberView, SelectionContext
from policies import registry
from policies.base import AggregationPolicy, SelectionPolicy

AGGREGATIONS = registry.names("aggregation")
SELECTIONS = registry.names("selection")


def answer(probs: list[list[float]], member: str = "m") -> MemberAnswer:
    return MemberAnswer(member, "edge", "edge/0", np.asarray(probs, dtype=np.float32), 0.001)


def test_builtins_registered() -> None:
    assert {"mean_probability", "majority_vote"} <= set(AGGREGATIONS)
    assert "all" in SELECTIONS


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register("selection", "all")(object)


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(KeyError, match=r"registered: .*all"):
        registry.lookup("selection", "nope")


def test_params_validated() -> None:
    with pytest.raises(ValidationError):
        registry.lookup("aggregation", "mean_probability").build({"unexpected": 1})
    assert issubclass(registry.lookup("selection", "all").params_model, BaseModel)


@pytest.mark.parametrize("name", SELECTIONS)
def test_selection_conformance(name: str) -> None:
    policy = registry.build("selection", name, None, SelectionPolicy)
    members = tuple(MemberView(f"m{i}", ("edge",), 0.9, True) for i in range(3))
    chosen = policy.select(SelectionContext("e", members, 1))
    assert chosen and set(chosen) <= {m.name for m in members}
    assert len(set(chosen)) == len(chosen)


def test_select_all_skips_unready_members() -> None:
    policy = registry.build("selection", "all", None, SelectionPolicy)
    members = (MemberView("a", ("edge",), None, True), MemberView("b", ("cloud",), None, False))
    assert policy.select(SelectionContext("e", members, 1)) == ("a",)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregation_conformance(name: str) -> None:
    policy = registry.build("aggregation", name, None, AggregationPolicy)
    answers = [
        answer([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "a"),
        answer([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], "b"),
        answer([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]], "c"),
    ]
    agg = policy.aggregate(answers, 3)
    assert agg.probabilities.shape == (2, 3)
    assert agg.class_index.tolist() == [0, 2]
    assert np.all((agg.confidence >= 0) & (agg.confidence <= 1))
    # partial results: any non-empty subset still aggregates
    assert policy.aggregate(answers[:1], 3).class_index.tolist() == [0, 2]
    with pytest.raises(ValueError):
        policy.aggregate([], 3)


probability_rows = st.lists(
    st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4), min_size=1, max_size=5
).map(lambda rows: (np.asarray(rows) / np.asarray(rows).sum(axis=1, keepdims=True)).tolist())


@pytest.mark.parametrize("name", AGGREGATIONS)
@settings(max_examples=50, deadline=None)
@given(rows=probability_rows, copies=st.integers(1, 5))
def test_identical_answers_return_that_answer(
    name: str, rows: list[list[float]], copies: int
) -> None:
    policy = registry.build("aggregation", name, None, AggregationPolicy)
    agg = policy.aggregate([answer(rows, f"m{i}") for i in range(copies)], 4)
    assert agg.class_index.tolist() == np.asarray(rows, dtype=np.float32).argmax(axis=1).tolist()


def test_majority_vote_tie_broken_by_probability() -> None:
    policy = registry.build("aggregation", "majority_vote", None, AggregationPolicy)
    agg = policy.aggregate([answer([[0.9, 0.1]], "a"), answer([[0.4, 0.6]], "b")], 2)
    assert agg.class_index.tolist() == [0]
    assert agg.confidence.tolist() == [0.5]
