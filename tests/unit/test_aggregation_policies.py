"""Behaviour of each aggregation policy: weighted_vote, majority_vote, max_confidence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ensemble.types import AggregationContext, MemberAnswer, MemberView
from policies import registry
from policies.base import AggregationPolicy


def build(name: str, **params: Any) -> Any:
    return registry.build("aggregation", name, params, AggregationPolicy)


def ans(member: str, probs: list[list[float]]) -> MemberAnswer:
    return MemberAnswer(member, "edge", f"{member}/0", np.asarray(probs, dtype=np.float32), 0.01)


def view(name: str, **kw: Any) -> MemberView:
    return MemberView(name, ("edge",), kw.pop("accuracy", None), True, **kw)


# Two weak members say class 1; one strong member says class 0.
SPLIT = [ans("weak1", [[0.2, 0.8]]), ans("weak2", [[0.3, 0.7]]), ans("strong", [[0.9, 0.1]])]


def test_weighted_vote_accuracy_weights() -> None:
    members = {"weak1": view("weak1", accuracy=0.3), "weak2": view("weak2", accuracy=0.3)}
    members["strong"] = view("strong", accuracy=0.9)
    agg = build("weighted_vote").aggregate(SPLIT, AggregationContext(2, members))
    assert agg.class_index.tolist() == [0]
    assert agg.probabilities.tolist()[0] == pytest.approx([0.6, 0.4])
    assert agg.confidence.tolist() == pytest.approx([0.6])


def test_weighted_vote_prefers_rolling_accuracy() -> None:
    members = {
        "weak1": view("weak1", accuracy=0.3, rolling_accuracy=0.9),
        "weak2": view("weak2", accuracy=0.3, rolling_accuracy=0.9),
        "strong": view("strong", accuracy=0.9, rolling_accuracy=0.5),
    }
    agg = build("weighted_vote").aggregate(SPLIT, AggregationContext(2, members))
    assert agg.class_index.tolist() == [1]


def test_weighted_vote_per_class_accuracy() -> None:
    members = {
        "weak1": view("weak1", per_class_accuracy=(0.9, 0.2)),
        "weak2": view("weak2", per_class_accuracy=(0.9, 0.2)),
        "strong": view("strong", per_class_accuracy=(0.5, 0.9)),
    }
    agg = build("weighted_vote", weights="per_class_accuracy").aggregate(
        SPLIT, AggregationContext(2, members)
    )
    # class 1 gets 0.2 + 0.2, class 0 gets 0.5
    assert agg.class_index.tolist() == [0]
    assert agg.confidence.tolist() == pytest.approx([0.5 / 0.9])


def test_weighted_vote_learned_weights_and_equal_fallback() -> None:
    policy = build("weighted_vote", weights="learned")
    learned = AggregationContext(2, {}, {"weak1": 0.1, "weak2": 0.1, "strong": 0.8})
    assert policy.aggregate(SPLIT, learned).class_index.tolist() == [0]
    # no data at all: a plain majority
    assert policy.aggregate(SPLIT, AggregationContext(2)).class_index.tolist() == [1]
    # a member with no data weighs as the mean of those with data (0.45), not as 1
    partial = AggregationContext(2, {}, {"weak1": 0.1, "strong": 0.8})
    agg = policy.aggregate(SPLIT, partial)
    assert agg.class_index.tolist() == [0]
    assert agg.probabilities.tolist()[0] == pytest.approx([0.8 / 1.35, 0.55 / 1.35])


def test_weighted_vote_zero_weights_fall_back_to_counting_heads() -> None:
    members = {m.member: view(m.member, accuracy=0.0) for m in SPLIT}
    agg = build("weighted_vote").aggregate(SPLIT, AggregationContext(2, members))
    assert agg.class_index.tolist() == [1]
    assert agg.confidence.tolist() == pytest.approx([2 / 3])


def test_weighted_vote_tie_goes_to_higher_summed_probability() -> None:
    answers = [ans("a", [[0.9, 0.1]]), ans("b", [[0.4, 0.6]])]
    agg = build("weighted_vote").aggregate(answers, AggregationContext(2))
    assert agg.class_index.tolist() == [0]
    assert agg.confidence.tolist() == pytest.approx([0.5])


def test_majority_vote_tie_broken_by_probability() -> None:
    answers = [ans("a", [[0.9, 0.1]]), ans("b", [[0.4, 0.6]])]
    agg = build("majority_vote").aggregate(answers, AggregationContext(2))
    assert agg.class_index.tolist() == [0]
    assert agg.confidence.tolist() == [0.5]


def test_max_confidence_takes_the_surest_answer_per_row() -> None:
    answers = [
        ans("a", [[0.6, 0.4], [0.05, 0.95]]),
        ans("b", [[0.99, 0.01], [0.3, 0.7]]),
    ]
    agg = build("max_confidence").aggregate(answers, AggregationContext(2))
    assert agg.class_index.tolist() == [0, 1]
    assert agg.confidence.tolist() == pytest.approx([0.99, 0.95])
    assert np.allclose(agg.probabilities, [[0.99, 0.01], [0.05, 0.95]])
