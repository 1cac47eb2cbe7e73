"""Clipper's bandit selection policies: `exp3` (one member per request) and `exp4` (weights)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import Feedback, MemberAnswer, SelectionContext
from policies.registry import register
from policies.selection import allowed, not_yet_asked


@dataclass(frozen=True, slots=True)
class BanditState:
    """Member weights s_i (max normalised to 1) and how many draws were made (seeds the RNG)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    draws: int = 0


class BanditParams(BaseModel):
    """Params of `exp3` and `exp4`."""

    model_config = ConfigDict(extra="forbid")

    eta: float = Field(default=0.01, gt=0.0, le=10.0, description="Learning rate (Clipper: 0.01).")
    seed: int = Field(default=0, description="Seed of the draws; same seed and state, same pick.")
    min_weight: float = Field(
        default=1e-6,
        gt=0.0,
        lt=1.0,
        description="Floor of a weight relative to the largest: no member is starved for "
        "good, and 1/p_i in the update stays finite.",
    )


def with_members(state: BanditState, names: Iterable[str]) -> BanditState:
    """``state`` with any new member added at the mean weight (1 when none is known)."""
    new = [n for n in names if n not in state.weights]
    if not new:
        return state
    weights = dict(state.weights)
    mean = sum(weights.values()) / len(weights) if weights else 1.0
    for name in new:
        weights[name] = mean
    return BanditState(weights, state.draws)


def _loss(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of the request's rows the member got wrong: Clipper's 0/1 loss, averaged."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean(np.asarray(predicted) != labels))


def _normalised(weights: dict[str, float], min_weight: float) -> dict[str, float]:
    """Scale so the largest weight is 1 and floor the rest: weights stay positive and finite."""
    top = max(weights.values(), default=1.0)
    if not math.isfinite(top) or top <= 0.0:
        return dict.fromkeys(weights, 1.0)
    return {m: max(w / top, min_weight) for m, w in weights.items()}


def exp4_weights(state: BanditState) -> dict[str, float]:
    """Weights summing to 1, for ``AggregationContext.weights``."""
    total = sum(state.weights.values())
    if total <= 0.0:
        return {}
    return {m: w / total for m, w in state.weights.items()}


@register("selection", "exp3", params=BanditParams)
class Exp3:
    """Clipper's Exp3: ask one member, drawn with probability s_i / sum(s) over allowed ones.

    Feedback with loss L (share of wrong rows) updates the asked member only:
    s_i <- s_i * exp(-eta * L / p_i), with p_i its current share of all known weights (the
    draw's exact p_i is not carried to feedback; the two differ only when membership changed
    in between). Each draw uses an RNG seeded from (seed, draws), so it is deterministic given
    the state. A member first seen later starts at the mean weight.
    """

    def __init__(self, params: BanditParams) -> None:
        self.params = params

    def initial_state(self) -> BanditState:
        return BanditState()

    def weights(self, state: BanditState) -> Mapping[str, float] | None:
        """Exp3 asks one member, so there is nothing to weigh."""
        del state
        return None

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: BanditState
    ) -> tuple[tuple[str, ...], BanditState]:
        if answers:
            return (), state
        candidates = not_yet_asked(allowed(ctx), answers)
        if not candidates:
            return (), state
        state = with_members(state, candidates)
        rng = random.Random(f"exp3:{self.params.seed}:{state.draws}")
        pick = rng.choices(candidates, weights=[state.weights[c] for c in candidates])[0]
        # A pick the request already asked (it failed) is not named again: the request ends.
        return not_yet_asked((pick,), answers, ctx.asked), BanditState(
            state.weights, state.draws + 1
        )

    def feedback(self, event: Feedback, state: BanditState) -> BanditState:
        state = with_members(state, event.predicted)
        weights = dict(state.weights)
        total = sum(weights.values())
        for member, predicted in event.predicted.items():
            p = weights[member] / total
            weights[member] *= math.exp(-self.params.eta * _loss(predicted, event.labels) / p)
        return BanditState(_normalised(weights, self.params.min_weight), state.draws)


@register("selection", "exp4", params=BanditParams)
class Exp4:
    """Clipper's Exp4: ask every allowed member; aggregation weighs them by learned s_i.

    ``weights(state)`` (same as ``exp4_weights``) gives the normalised weights the runtime
    passes as ``AggregationContext.weights``, for `weighted_vote` with ``weights: learned``.
    Feedback updates every member that answered: s_i <- s_i * exp(-eta * L_i), with L_i its
    share of wrong rows (every member was asked, so no 1/p_i importance correction).
    """

    def __init__(self, params: BanditParams) -> None:
        self.params = params

    def initial_state(self) -> BanditState:
        return BanditState()

    def weights(self, state: BanditState) -> Mapping[str, float] | None:
        return exp4_weights(state) or None

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: BanditState
    ) -> tuple[tuple[str, ...], BanditState]:
        if answers:
            return (), state
        chosen = not_yet_asked(allowed(ctx), answers)
        return not_yet_asked(chosen, answers, ctx.asked), with_members(state, chosen)

    def feedback(self, event: Feedback, state: BanditState) -> BanditState:
        state = with_members(state, event.predicted)
        weights = dict(state.weights)
        for member, predicted in event.predicted.items():
            weights[member] *= math.exp(-self.params.eta * _loss(predicted, event.labels))
        return BanditState(_normalised(weights, self.params.min_weight), state.draws)
