"""Aggregation policies: combine members' class probabilities into one answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensemble.types import Aggregate, MemberAnswer
from policies.registry import NoParams, register


def _stack(answers: Sequence[MemberAnswer], n_classes: int) -> np.ndarray:
    """Answers as one array [members, batch, n_classes]; rejects an empty or ragged set."""
    if not answers:
        raise ValueError("cannot aggregate zero answers")
    stacked = np.stack([a.probabilities for a in answers])
    if stacked.shape[-1] != n_classes:
        raise ValueError(f"answers have {stacked.shape[-1]} classes, expected {n_classes}")
    return stacked


@register("aggregation", "mean_probability")
class MeanProbability:
    """Average the members' class probabilities; confidence is the winner's mean probability."""

    def __init__(self, params: NoParams) -> None:
        del params

    def aggregate(self, answers: Sequence[MemberAnswer], n_classes: int) -> Aggregate:
        if not answers:
            raise ValueError("cannot aggregate zero answers")
        # A running sum: on a handful of small arrays, np.stack + mean costs several times more.
        total = np.array(answers[0].probabilities, dtype=np.float32)
        if total.shape[-1] != n_classes:
            raise ValueError(f"answers have {total.shape[-1]} classes, expected {n_classes}")
        for answer in answers[1:]:
            total += answer.probabilities
        total /= len(answers)
        winner = total.argmax(axis=1)
        confidence = total[np.arange(total.shape[0]), winner].astype(np.float64)
        return Aggregate(total, winner, confidence)


@register("aggregation", "majority_vote")
class MajorityVote:
    """Each member votes for its top class; ties go to the higher summed probability.

    The returned probabilities are vote shares, and confidence is the winner's share of votes
    (Clipper's "share of members agreeing").
    """

    def __init__(self, params: NoParams) -> None:
        del params

    def aggregate(self, answers: Sequence[MemberAnswer], n_classes: int) -> Aggregate:
        stacked = _stack(answers, n_classes)
        n_members, batch, _ = stacked.shape
        votes = np.zeros((batch, n_classes), dtype=np.float64)
        rows = np.arange(batch)
        for member_probs in stacked:
            np.add.at(votes, (rows, member_probs.argmax(axis=1)), 1.0)
        # Summed probability is < n_members, so scaled by 1/n_members**2 it can only break ties.
        tie_break = stacked.sum(axis=0) / (n_members * n_members + 1.0)
        winner = (votes + tie_break).argmax(axis=1)
        shares = votes / n_members
        return Aggregate(shares.astype(np.float32), winner, shares[rows, winner])
