"""Selection policy `cocktail` (NSDI'22): per-class vote weights, ensemble resized per window."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import (
    Feedback,
    MemberAnswer,
    MemberView,
    Pick,
    SelectionContext,
)
from policies.ensemble_math import majority_quorum, tally
from policies.registry import register
from policies.selection import Tail, allowed_views, fits, not_yet_asked, pick, placement_for


class CocktailParams(BaseModel):
    """Params of `cocktail`."""

    model_config = ConfigDict(extra="forbid")

    target_accuracy: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Accuracy the ensemble should keep."
    )
    window: int = Field(default=100, ge=1, description="Feedback events per resize decision.")
    min_members: int = Field(default=1, ge=1, description="Never shrink below this many members.")
    cooldown_windows: int = Field(
        default=1, ge=0, description="Windows after a resize in which no resize happens."
    )
    band: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Shrink above target + band, grow below target - band (Cocktail: 2 points).",
    )
    initial_members: int | None = Field(
        default=None, ge=1, description="Start with this many best members; None: all allowed."
    )
    estimates: Literal["live", "card"] = Field(
        default="live",
        description="`live`: ask each active member on the tier that fits the time left by "
        "its live latency at the lowest price, leaving out members no tier of which fits "
        "(the fastest is asked when none does); `card`: routing picks tiers, none left out.",
    )
    tail: Tail = Field(default="p95", description="Which live latency must fit the time left.")


@dataclass(frozen=True, slots=True)
class CocktailState:
    """Learned counts, the active member set and the current window's tallies."""

    correct: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    """Member -> class -> times it was right on that class (its per-class vote weight - 1)."""
    active: tuple[str, ...] | None = None
    """Members asked per request; None until the first request picks the initial set."""
    ranking: tuple[str, ...] = ()
    """Allowed members, best card accuracy first, as of the last request: the growth order."""
    window_events: int = 0
    window_rows: int = 0
    window_correct: int = 0
    window_margins: tuple[int, ...] = ()
    """Per row: winner's raw votes minus ceil(0.51 N)."""
    cooldown: int = 0
    """Windows left in which resizing is held off (hysteresis)."""


def _total_correct(state: CocktailState, member: str) -> int:
    return sum(state.correct.get(member, {}).values())


@register("selection", "cocktail", params=CocktailParams)
class Cocktail:
    """Cocktail: ask the active set; resize it every ``window`` feedback events.

    The ensemble's answer on feedback is a per-class weighted vote (a member's weight for class
    c is 1 + the times it was right on c). At a window's end: accuracy >= target + band and a
    median vote margin of k over ceil(0.51 N) drops the k members with the fewest correct
    answers (never below ``min_members``); accuracy <= target - band adds the best unused
    member by card accuracy. After a resize, ``cooldown_windows`` windows pass without one.
    ``weights(state)`` exposes each member's share of correct answers (plus one) for
    aggregation with ``weights: learned``.
    """

    def __init__(self, params: CocktailParams) -> None:
        self.params = params

    def initial_state(self) -> CocktailState:
        return CocktailState()

    def weights(self, state: CocktailState) -> Mapping[str, float] | None:
        if state.active is None:
            return None
        raw = {m: 1.0 + _total_correct(state, m) for m in state.active}
        total = sum(raw.values())
        return {m: w / total for m, w in raw.items()}

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: CocktailState
    ) -> tuple[tuple[str | Pick, ...], CocktailState]:
        if answers:
            return (), state
        views = allowed_views(ctx)
        views.sort(key=lambda v: (-(v.accuracy or 0.0), v.cost_per_call, v.name))
        ranking = tuple(v.name for v in views)
        active = state.active
        if active is None:
            active = ranking[: self.params.initial_members or len(ranking)]
        ok = set(ranking)
        chosen = [m for m in active if m in ok]
        if not chosen:
            # The whole active set is unavailable: ask the best available ones instead.
            chosen = list(ranking[: max(self.params.min_members, 1)])
        state = replace(state, active=active, ranking=ranking)
        if self.params.estimates == "card":
            return not_yet_asked(chosen, answers, ctx.asked), state
        return not_yet_asked(self._place(chosen, views, ctx), answers, ctx.asked), state

    def _place(
        self, chosen: list[str], views: list[MemberView], ctx: SelectionContext
    ) -> list[str | Pick]:
        """The chosen members on the tiers that fit the time left; those that fit nowhere are
        left out, unless none fits (then the fastest of them is asked)."""
        by_name = {v.name: v for v in views}
        tail = self.params.tail
        placed = [(by_name[m], placement_for(by_name[m], ctx, tail)) for m in chosen]
        fitting = [pick(v, p) for v, p in placed if fits(p, ctx, tail)]
        if fitting or not placed:
            return fitting
        v, p = min(placed, key=lambda vp: (vp[1].tail_s(tail) or 0.0) if vp[1] else 0.0)
        return [pick(v, p)]

    def feedback(self, event: Feedback, state: CocktailState) -> CocktailState:
        if not event.predicted:
            return state
        labels = np.asarray(event.labels)
        n_classes = max(event.n_classes, int(labels.max(initial=0)) + 1)
        top = {m: np.asarray(p, dtype=np.intp) for m, p in event.predicted.items()}
        class_weight = {m: self._class_weights(state, m, n_classes) for m in top}
        predicted = tally(top, n_classes, class_weight).argmax(axis=1)
        raw = tally(top, n_classes)
        margins = raw[np.arange(len(labels)), predicted] - majority_quorum(len(top))

        correct = {m: dict(c) for m, c in state.correct.items()}
        for member, classes in top.items():
            counts = correct.setdefault(member, {})
            for label in labels[classes == labels].tolist():
                counts[int(label)] = counts.get(int(label), 0) + 1
        state = replace(
            state,
            correct=correct,
            window_events=state.window_events + 1,
            window_rows=state.window_rows + len(labels),
            window_correct=state.window_correct + int(np.sum(predicted == labels)),
            window_margins=state.window_margins + tuple(int(x) for x in margins),
        )
        if state.window_events < self.params.window:
            return state
        return self._resize(state)

    @staticmethod
    def _class_weights(state: CocktailState, member: str, n_classes: int) -> np.ndarray:
        """Per-class vote weight of ``member``: 1 plus the times it was right on the class."""
        weights = np.ones(n_classes, dtype=np.float64)
        for cls, count in state.correct.get(member, {}).items():
            if 0 <= cls < n_classes:
                weights[cls] += count
        return weights

    def _resize(self, state: CocktailState) -> CocktailState:
        """Close the window: maybe shrink or grow the active set, then start a new window."""
        fresh = replace(state, window_events=0, window_rows=0, window_correct=0, window_margins=())
        if state.cooldown > 0:
            return replace(fresh, cooldown=state.cooldown - 1)
        active = list(state.active if state.active is not None else state.ranking)
        accuracy = state.window_correct / state.window_rows if state.window_rows else 0.0
        p = self.params
        if accuracy >= p.target_accuracy + p.band:
            margin = int(np.median(state.window_margins)) if state.window_margins else 0
            k = min(margin, len(active) - p.min_members)
            if k <= 0:
                return fresh
            # Fewest correct answers go first; ties drop the later (lower ranked) member.
            order = sorted(active, key=lambda m: (_total_correct(state, m), -active.index(m)))
            dropped = set(order[:k])
            kept = tuple(m for m in active if m not in dropped)
            return replace(fresh, active=kept, cooldown=p.cooldown_windows)
        if accuracy <= p.target_accuracy - p.band:
            unused = [m for m in state.ranking if m not in active]
            if not unused:
                return fresh
            return replace(fresh, active=(*active, unused[0]), cooldown=p.cooldown_windows)
        return fresh
