"""Selection policies: which members answer a request (`all`, `static`, `cascade`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import (
    Feedback,
    MemberAnswer,
    MemberView,
    Pick,
    PlacementView,
    SelectionContext,
)
from policies.ensemble_math import mean_top_confidence
from policies.registry import NoParams, register


class Stateless:
    """Mixin for selection policies that keep no state, ignore feedback and learn no weights."""

    def initial_state(self) -> Any:
        return None

    def feedback(self, event: Feedback, state: Any) -> Any:
        del event
        return state

    def weights(self, state: Any) -> Mapping[str, float] | None:
        """Member weights for ``AggregationContext.weights``; stateless policies have none."""
        del state
        return None


def permitted(ctx: SelectionContext) -> list[str]:
    """Members on a tier the contract allows, ready or not (data must never leave its tier)."""
    tier = ctx.contract.tier
    return [m.name for m in ctx.members if tier is None or tier in m.tiers]


def allowed(ctx: SelectionContext) -> list[str]:
    """Members that are ready and on a tier the contract allows."""
    tier = ctx.contract.tier
    return [m.name for m in ctx.members if m.ready and (tier is None or tier in m.tiers)]


def allowed_views(ctx: SelectionContext) -> list[MemberView]:
    """``allowed`` as member views, in the context's order."""
    names = set(allowed(ctx))
    return [m for m in ctx.members if m.name in names]


P = TypeVar("P", bound=str | Pick)


def not_yet_asked(
    names: Iterable[P], answers: Sequence[MemberAnswer], asked: Iterable[str] = ()
) -> tuple[P, ...]:
    """``names`` minus the members that already answered or were ``asked`` (the request's
    ``ctx.asked``: a member that failed has no answer), order kept, duplicates dropped."""
    seen = {a.member for a in answers} | set(asked)
    out: list[P] = []
    for pick in names:
        name = pick if isinstance(pick, str) else pick.member
        if name not in seen:
            seen.add(name)
            out.append(pick)
    return tuple(out)


Tail = Literal["p50", "p95", "p99"]
"""Which latency of a placement must fit the time left."""


def _tail(placement: PlacementView, tail: Tail) -> float:
    """Its ``tail`` latency; an unknown one counts as 0 (let it run and be measured)."""
    seconds = placement.tail_s(tail)
    return 0.0 if seconds is None else seconds


def _usable(view: MemberView, ctx: SelectionContext) -> list[PlacementView]:
    """The member's ready placements on a tier the contract allows."""
    tier = ctx.contract.tier
    return [p for p in view.placements if p.ready and (tier is None or p.tier == tier)]


def placement_for(
    view: MemberView, ctx: SelectionContext, tail: Tail = "p95", safety: float = 1.0
) -> PlacementView | None:
    """Where to ask ``view``'s member now, from its live placements: among the ready ones on a
    tier the contract allows, those whose ``tail`` latency times ``safety`` fits the time
    left; of those the least failing (error rates in tenths), then the cheapest, then the
    fastest. When none fits, the fastest. None when it has no such placement."""
    options = _usable(view, ctx)
    if not options:
        return None
    fitting = [p for p in options if fits(p, ctx, tail, safety)]
    if fitting:
        return min(fitting, key=lambda p: (round(p.error_rate, 1), p.cost_per_call, _tail(p, tail)))
    return min(options, key=lambda p: (_tail(p, tail), p.cost_per_call))


def fits(
    placement: PlacementView | None, ctx: SelectionContext, tail: Tail, safety: float = 1.0
) -> bool:
    """Whether a call there is expected to answer in the time left (unknown: it may)."""
    left = ctx.remaining_s
    return placement is None or left is None or _tail(placement, tail) * safety <= left


def _cheapest(view: MemberView, ctx: SelectionContext) -> tuple[float, float]:
    """(price, median latency) of the member's cheapest ready placement the contract allows;
    its first tier's price and card latency when it has no placements."""
    options = _usable(view, ctx)
    if not options:
        return view.cost_per_call, view.latency_s if view.latency_s is not None else math.inf
    best = min(options, key=lambda p: (p.cost_per_call, _tail(p, "p50")))
    return best.cost_per_call, _tail(best, "p50")


def pick(view: MemberView, placement: PlacementView | None) -> str | Pick:
    """The member on ``placement``'s tier; its plain name (routing's choice) without one."""
    return view.name if placement is None else Pick(view.name, placement.tier)


@register("selection", "all")
class SelectAll(Stateless):
    """Ask every ready member the contract allows, at once."""

    def __init__(self, params: NoParams) -> None:
        del params

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str | Pick, ...], Any]:
        if answers:
            return (), state
        # With nothing ready, try the permitted ones anyway: readiness may lag a recovery,
        # and the runtime turns their failures into a clear error.
        return not_yet_asked(allowed(ctx) or permitted(ctx), answers, ctx.asked), state


class StaticParams(BaseModel):
    """Params of `static`."""

    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(
        min_length=1, description="Members to ask, in order; unready or off-tier ones are skipped."
    )


@register("selection", "static", params=StaticParams)
class Static(Stateless):
    """Ask a fixed, named subset of the members (those ready and on an allowed tier), at once.

    When none of them is available the first call returns ``()``: no member can answer.
    """

    def __init__(self, params: StaticParams) -> None:
        self.members = tuple(params.members)

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str | Pick, ...], Any]:
        if answers:
            return (), state
        ok = set(allowed(ctx))
        return not_yet_asked((m for m in self.members if m in ok), answers, ctx.asked), state


class CascadeParams(BaseModel):
    """Params of `cascade`."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="Escalate while the answers' confidence on some row is below this.",
    )
    per_class: dict[int, float] | None = Field(
        default=None,
        description="Thresholds by predicted class index (FrugalML); others use `threshold`.",
    )
    order: list[str] | None = Field(
        default=None,
        description="Escalation order; default cheapest first, then fastest (see `estimates`).",
    )
    estimates: Literal["live", "card"] = Field(
        default="live",
        description="`live`: order by each member's cheapest tier now (its price, then its live "
        "median latency), ask each on the tier that fits the time left, and escalate only to "
        "members that still fit; `card`: order by the first tier's price and the card's "
        "latency, and let routing pick tiers.",
    )
    tail: Tail = Field(
        default="p95",
        description="The live latency that must fit the time left before a member is asked.",
    )


@register("selection", "cascade", params=CascadeParams)
class Cascade(Stateless):
    """Ask the cheapest member, then escalate one member at a time while confidence is low.

    Confidence of the answers so far is, per row, the top probability of their mean
    probabilities (the mean-probability aggregate); the request escalates while any row is
    below its threshold: ``per_class[predicted class]`` if given, else ``threshold``.
    Escalation resumes after the furthest member in the order already asked (answered or
    failed), so a member that failed is skipped and the next one is asked instead. With live
    estimates a member whose every placement is too slow for the time left is skipped too,
    and the cascade stops when none fits (the first stage asks the fastest when none does).
    """

    def __init__(self, params: CascadeParams) -> None:
        self.threshold = params.threshold
        self.per_class = dict(params.per_class or {})
        self.order = tuple(params.order) if params.order is not None else None
        self.live = params.estimates == "live"
        self.tail: Tail = params.tail

    def _order(self, ctx: SelectionContext) -> list[MemberView]:
        views = allowed_views(ctx)
        if self.order is not None:
            by_name = {v.name: v for v in views}
            return [by_name[m] for m in self.order if m in by_name]
        if self.live:
            # The order must not change between stages: it ranks each member by its cheapest
            # tier (its median now), not by what fits the shrinking time left.
            return sorted(views, key=lambda v: (*_cheapest(v, ctx), v.name))
        views.sort(
            key=lambda v: (
                v.cost_per_call,
                v.latency_s if v.latency_s is not None else math.inf,
                v.name,
            )
        )
        return views

    def confident(self, answers: Sequence[MemberAnswer]) -> bool:
        """Whether every row's confidence reaches its (per predicted class) threshold."""
        winner, confidence = mean_top_confidence([a.probabilities for a in answers])
        return all(
            float(c) >= self.per_class.get(int(w), self.threshold)
            for w, c in zip(winner, confidence, strict=True)
        )

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str | Pick, ...], Any]:
        if answers and self.confident(answers):
            return (), state
        order = self._order(ctx)
        # Asked includes members that failed: escalation moves past them too (failover).
        tried = {a.member for a in answers} | set(ctx.asked)
        furthest = max((i for i, v in enumerate(order) if v.name in tried), default=-1)
        rest = [v for v in order[furthest + 1 :] if v.name not in tried]
        if not rest or not self.live:
            return tuple(v.name for v in rest[:1]), state
        for v in rest:
            placement = placement_for(v, ctx, self.tail)
            if fits(placement, ctx, self.tail):
                return (pick(v, placement),), state
        # Nothing left fits the time: stop, unless nothing has answered yet.
        return ((), state) if answers else ((pick(rest[0], placement_for(rest[0], ctx)),), state)
