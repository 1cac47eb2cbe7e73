"""Input drift and uncertainty: the training reference in a card, the PSI of a window against
it, the watch's score and its log lines when crossing the threshold, out-of-range features,
and a profile's verdict on an answer's entropy, disagreement and input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ensemble.config import UncertaintyConfig
from ensemble.dataplane.uncertainty import assess
from ensemble.drift import InputWatch, psi, watch_for
from ensemble.models.reference import input_reference
from ensemble.types import Aggregate, MemberAnswer, TensorSpec
from policies.ensemble_math import disagreement, normalized_entropy

RNG = np.random.default_rng(0)
TRAIN = np.column_stack(
    [RNG.uniform(0, 16, 2000), np.zeros(2000), RNG.integers(0, 17, 2000).astype(float)]
)


def test_the_reference_bins_each_feature_at_its_deciles() -> None:
    ref = input_reference("input", TRAIN)
    assert ref.input == "input" and ref.rows == 2000
    uniform, constant, discrete = ref.edges
    assert len(discrete) >= 5  # integers 0..16: some deciles repeat
    assert len(uniform) == 9 and uniform[0] == pytest.approx(1.6, abs=0.3)
    assert ref.proportions[0] == pytest.approx([0.1] * 10, abs=0.01)
    assert constant == [0.0] and ref.proportions[1] == [1.0, 0.0]  # one edge, two bins
    assert sum(ref.proportions[2]) == pytest.approx(1.0)
    assert ref.low == [pytest.approx(TRAIN[:, 0].min()), 0.0, 0.0] and ref.high[2] == 16.0


def test_psi_is_zero_on_the_reference_and_sums_the_shifted_bins() -> None:
    edges = np.array([[1.0]])
    expected = np.array([[0.5, 0.5]])
    same = np.array([[0.0], [2.0]])
    assert psi(same, edges, expected) == pytest.approx(0.0)
    shifted = np.array([[0.0], [2.0], [2.0], [2.0]])  # 25% / 75% against 50% / 50%
    by_hand = (0.25 - 0.5) * np.log(0.25 / 0.5) + (0.75 - 0.5) * np.log(0.75 / 0.5)
    assert psi(shifted, edges, expected) == pytest.approx(by_hand)


def test_the_watch_scores_each_window_and_logs_crossings(caplog: pytest.LogCaptureFixture) -> None:
    scores: list[float] = []
    watch = InputWatch(
        "digits",
        input_reference("input", TRAIN),
        window=200,
        threshold=0.2,
        on_score=lambda _, s: scores.append(s),
    )
    clean = TRAIN[RNG.integers(0, 2000, 400)].astype(np.float32)
    noisy = clean + RNG.normal(0, 4, clean.shape).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="ensemble.drift"):
        for row in clean:
            watch.observe(row[None, :])
        assert watch.windows == 2 and watch.score is not None and watch.score < 0.1
        watch.observe(noisy[:150])  # not a full window yet: the score is the last one's
        assert watch.windows == 2 and not watch.drifting
        watch.observe(noisy[150:])  # 400 rows in one request: two windows
        assert watch.windows == 4 and watch.drifting and watch.score > 0.2
        for row in clean[:200]:
            watch.observe(row[None, :])
    assert len(scores) == 5 and not watch.drifting
    lines = [r.getMessage() for r in caplog.records]
    assert sum("input drift" in line and ">=" in line for line in lines) == 1
    assert sum("back to" in line for line in lines) == 1


def test_outliers_are_the_worst_rows_share_of_features_out_of_range() -> None:
    watch = InputWatch("digits", input_reference("input", TRAIN))
    inside = np.array([[8.0, 0.0, 3.0]], np.float32)
    assert watch.outliers(inside) == 0.0
    rows = np.array([[8.0, 0.0, 3.0], [-1.0, 2.0, 3.0]], np.float32)
    assert watch.outliers(rows) == pytest.approx(2 / 3)


def test_a_watch_needs_a_reference_as_wide_as_the_input() -> None:
    ref = input_reference("input", TRAIN)
    spec = TensorSpec("input", "FP32", (-1, 3))
    assert watch_for("e", spec, [None, ref], window=50, threshold=0.2) is not None
    narrow = TensorSpec("input", "FP32", (-1, 4))
    assert watch_for("e", narrow, [ref], window=50, threshold=0.2) is None
    assert (
        watch_for("e", TensorSpec("input", "FP32", (-1,)), [ref], window=50, threshold=0.2) is None
    )


def answer(name: str, rows: list[list[float]]) -> MemberAnswer:
    return MemberAnswer(name, "edge", f"{name}/0", np.asarray(rows, np.float32), 0.001)


def aggregate(answers: list[MemberAnswer]) -> Aggregate:
    mean = np.mean([a.probabilities for a in answers], axis=0)
    return Aggregate(mean, mean.argmax(axis=1), mean.max(axis=1))


def test_entropy_and_disagreement_per_row() -> None:
    entropy = normalized_entropy(np.array([[1.0, 0.0], [0.5, 0.5]]))
    assert entropy == pytest.approx([0.0, 1.0], abs=1e-9)
    tops = [np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]]), np.array([[0.6, 0.4]])]
    assert disagreement(tops, np.array([0])) == pytest.approx([1 / 3])


def test_a_profile_calls_an_answer_uncertain_by_any_threshold_it_sets() -> None:
    sure = [answer("a", [[0.95, 0.05]]), answer("b", [[0.9, 0.1]])]
    split = [answer("a", [[0.9, 0.1]]), answer("b", [[0.2, 0.8]])]
    by_entropy = UncertaintyConfig(entropy=0.5)
    assert not assess(by_entropy, aggregate(sure), sure, None).uncertain
    assert assess(by_entropy, aggregate(split), split, None).uncertain
    by_split = UncertaintyConfig(disagreement=0.3)
    doubt = assess(by_split, aggregate(split), split, None)
    assert doubt.uncertain and doubt.disagreement == 0.5
    assert assess(by_split, aggregate(sure[:1]), sure[:1], None).disagreement is None
    by_input = UncertaintyConfig(input_outliers=0.1)
    assert assess(by_input, aggregate(sure), sure, 0.2).uncertain
    assert not assess(by_input, aggregate(sure), sure, None).uncertain  # not watched
    assert assess(UncertaintyConfig(), aggregate(split), split, 1.0).uncertain is False
    params = assess(by_input, aggregate(sure), sure, 0.2).parameters(escalated=True)
    assert params["uncertain"] is True and params["escalated"] is True
    assert params["input_outliers"] == 0.2 and "disagreement" in params
