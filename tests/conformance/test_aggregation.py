"""Every registered aggregation policy: one answer of shape [batch, n_classes] with rows summing
to 1, from any non-empty subset of the members' answers, without touching them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ensemble.types import AggregationContext, MemberAnswer, MemberView
from policies import registry
from policies.base import AggregationPolicy
from tests.conformance.registered import build, check_entry

AGGREGATIONS = registry.names("aggregation")


def aggregation(name: str) -> Any:
    return build("aggregation", name, AggregationPolicy)


def answer(probs: Any, member: str = "m") -> MemberAnswer:
    return MemberAnswer(member, "edge", f"{member}/0", np.asarray(probs, dtype=np.float32), 0.001)


THREE = [
    answer([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "a"),
    answer([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], "b"),
    answer([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]], "c"),
]


def test_builtins_registered() -> None:
    assert {"mean_probability", "majority_vote", "weighted_vote", "max_confidence"} <= set(
        AGGREGATIONS
    )


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("aggregation", name)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_combines_any_non_empty_subset_and_rejects_bad_input(name: str) -> None:
    policy = aggregation(name)
    ctx = AggregationContext(3)
    agg = policy.aggregate(THREE, ctx)
    assert agg.probabilities.shape == (2, 3)
    assert agg.class_index.tolist() == [0, 2]
    assert agg.confidence.shape == (2,)
    assert np.all((agg.confidence >= 0) & (agg.confidence <= 1))
    assert np.allclose(agg.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Partial results: any non-empty subset still aggregates.
    assert policy.aggregate(THREE[:1], ctx).class_index.tolist() == [0, 2]
    assert policy.aggregate(THREE[1:], ctx).class_index.shape == (2,)
    with pytest.raises(ValueError):
        policy.aggregate([], ctx)
    with pytest.raises(ValueError):
        policy.aggregate(THREE, AggregationContext(4))


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_one_member_and_many_rows_keep_that_members_classes(name: str) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=64).astype(np.float32)
    agg = aggregation(name).aggregate([answer(probs, "x")], AggregationContext(5))
    assert agg.class_index.tolist() == probs.argmax(axis=1).tolist()
    assert agg.probabilities.shape == (64, 5)


@st.composite
def answer_sets(draw: st.DrawFn) -> tuple[int, list[MemberAnswer]]:
    """1-5 members answering the same batch (1-8 rows) over 2-6 classes."""
    n_classes = draw(st.integers(2, 6))
    batch = draw(st.integers(1, 8))
    members = draw(st.integers(1, 5))
    answers = []
    for i in range(members):
        raw = draw(hnp.arrays(np.float64, (batch, n_classes), elements=st.floats(0.01, 1.0)))
        answers.append(answer(raw / raw.sum(axis=1, keepdims=True), f"m{i}"))
    return n_classes, answers


@pytest.mark.parametrize("name", AGGREGATIONS)
@settings(max_examples=60, deadline=None)
@given(case=answer_sets(), weights=st.none() | st.floats(0.0, 10.0))
def test_output_is_a_distribution_per_row_and_inputs_stay_untouched(
    name: str, case: tuple[int, list[MemberAnswer]], weights: float | None
) -> None:
    n_classes, answers = case
    before = [a.probabilities.copy() for a in answers]
    learned = None if weights is None else {a.member: weights for a in answers}
    members = {a.member: MemberView(a.member, ("edge",), 0.8, True) for a in answers}
    agg = aggregation(name).aggregate(answers, AggregationContext(n_classes, members, learned))
    batch = answers[0].probabilities.shape[0]
    assert agg.probabilities.shape == (batch, n_classes)
    assert np.all(agg.probabilities >= 0)
    assert np.allclose(agg.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert agg.class_index.shape == (batch,)
    assert np.all((agg.class_index >= 0) & (agg.class_index < n_classes))
    assert agg.confidence.shape == (batch,)
    assert np.all((agg.confidence >= 0) & (agg.confidence <= 1 + 1e-6))
    for a, probs in zip(answers, before, strict=True):
        assert np.array_equal(a.probabilities, probs), "an answer was modified in place"


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
