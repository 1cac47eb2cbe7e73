"""Aggregation policies: combine members' class probabilities into one answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import Aggregate, AggregationContext, MemberAnswer
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

    def aggregate(self, answers: Sequence[MemberAnswer], ctx: AggregationContext) -> Aggregate:
        n_classes = ctx.n_classes
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
        confidence = total.max(axis=1).astype(np.float64)  # the winner's mean probability
        return Aggregate(total, winner, confidence)


@register("aggregation", "majority_vote")
class MajorityVote:
    """Each member votes for its top class; ties go to the higher summed probability.

    The returned probabilities are vote shares, and confidence is the winner's share of votes
    (Clipper's "share of members agreeing").
    """

    def __init__(self, params: NoParams) -> None:
        del params

    def aggregate(self, answers: Sequence[MemberAnswer], ctx: AggregationContext) -> Aggregate:
        stacked = _stack(answers, ctx.n_classes)
        n_classes = ctx.n_classes
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


class WeightedVoteParams(BaseModel):
    """Params of `weighted_vote`."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["accuracy", "per_class_accuracy", "learned"] = Field(
        default="accuracy",
        description="`accuracy`: a member's rolling accuracy, else its card accuracy; "
        "`per_class_accuracy`: its card accuracy on the class it votes for; `learned`: the "
        "selection policy's weights (e.g. exp4's).",
    )


@register("aggregation", "weighted_vote", params=WeightedVoteParams)
class WeightedVote:
    """Each member votes for its top class with a weight; ties go to the higher summed probability.

    Probabilities are the normalised weighted vote shares; confidence is the winner's share.
    A member without data for the chosen weights votes with the mean weight of those with
    data (1 when none has any), so it counts as an average member, not as a perfect one.
    """

    def __init__(self, params: WeightedVoteParams) -> None:
        self.kind = params.weights

    def _member_weights(
        self, answers: Sequence[MemberAnswer], ctx: AggregationContext
    ) -> list[np.ndarray | None]:
        """Per answer: weight by class [n_classes], or None when the member has no data."""
        out: list[np.ndarray | None] = []
        for a in answers:
            view = ctx.members.get(a.member)
            w: float | None = None
            if self.kind == "learned":
                w = ctx.weights.get(a.member) if ctx.weights is not None else None
            elif view is not None and self.kind == "per_class_accuracy":
                per_class = view.per_class_accuracy
                if per_class is not None and len(per_class) == ctx.n_classes:
                    out.append(np.asarray(per_class, dtype=np.float64))
                    continue
            elif view is not None:
                w = view.rolling_accuracy if view.rolling_accuracy is not None else view.accuracy
            out.append(None if w is None else np.full(ctx.n_classes, float(w)))
        return out

    def aggregate(self, answers: Sequence[MemberAnswer], ctx: AggregationContext) -> Aggregate:
        stacked = _stack(answers, ctx.n_classes)
        _, batch, n_classes = stacked.shape
        weights = self._member_weights(answers, ctx)
        known = [w for w in weights if w is not None]
        mean = float(np.mean([w.mean() for w in known])) if known else 1.0
        fill = np.full(n_classes, mean if mean > 0.0 else 1.0)
        rows = np.arange(batch)
        votes = np.zeros((batch, n_classes), dtype=np.float64)
        for member_probs, w in zip(stacked, weights, strict=True):
            top = member_probs.argmax(axis=1)
            np.add.at(votes, (rows, top), np.clip((fill if w is None else w)[top], 0.0, None))
        total = votes.sum(axis=1, keepdims=True)
        if np.any(total <= 0.0):
            # Every voter on a row weighs 0 (say, all cards say 0% accuracy): count heads.
            plain = np.zeros_like(votes)
            for member_probs in stacked:
                np.add.at(plain, (rows, member_probs.argmax(axis=1)), 1.0)
            votes = np.where(total <= 0.0, plain, votes)
            total = votes.sum(axis=1, keepdims=True)
        shares = votes / total
        # Ties (within float noise) go to the higher summed probability, as in majority_vote.
        tied = shares >= shares.max(axis=1, keepdims=True) - 1e-12
        winner = np.where(tied, stacked.sum(axis=0), -np.inf).argmax(axis=1)
        return Aggregate(shares.astype(np.float32), winner, shares[rows, winner])


@register("aggregation", "max_confidence")
class MaxConfidence:
    """Per row, the answer of the member most sure of itself (highest top probability)."""

    def __init__(self, params: NoParams) -> None:
        del params

    def aggregate(self, answers: Sequence[MemberAnswer], ctx: AggregationContext) -> Aggregate:
        stacked = _stack(answers, ctx.n_classes)
        rows = np.arange(stacked.shape[1])
        best = stacked.max(axis=2).argmax(axis=0)
        probabilities = np.asarray(stacked[best, rows], dtype=np.float32)
        winner = probabilities.argmax(axis=1)
        confidence = probabilities[rows, winner].astype(np.float64)
        return Aggregate(probabilities, winner, confidence)
