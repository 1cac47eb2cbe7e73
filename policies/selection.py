"""Selection policies: which members answer a request (`all`, `static`, `cascade`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import Feedback, MemberAnswer, MemberView, SelectionContext
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


def not_yet_asked(
    names: Iterable[str], answers: Sequence[MemberAnswer], asked: Iterable[str] = ()
) -> tuple[str, ...]:
    """``names`` minus the members that already answered or were ``asked`` (the request's
    ``ctx.asked``: a member that failed has no answer), order kept, duplicates dropped."""
    seen = {a.member for a in answers} | set(asked)
    out: list[str] = []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
    return tuple(out)


@register("selection", "all")
class SelectAll(Stateless):
    """Ask every ready member the contract allows, at once."""

    def __init__(self, params: NoParams) -> None:
        del params

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str, ...], Any]:
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
    ) -> tuple[tuple[str, ...], Any]:
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
        description="Escalation order; default cheapest first (cost_per_call, then latency_s).",
    )


@register("selection", "cascade", params=CascadeParams)
class Cascade(Stateless):
    """Ask the cheapest member, then escalate one member at a time while confidence is low.

    Confidence of the answers so far is, per row, the top probability of their mean
    probabilities (the mean-probability aggregate); the request escalates while any row is
    below its threshold: ``per_class[predicted class]`` if given, else ``threshold``.
    Escalation resumes after the furthest member in the order already asked (answered or
    failed), so a member that failed is skipped and the next one is asked instead.
    """

    def __init__(self, params: CascadeParams) -> None:
        self.threshold = params.threshold
        self.per_class = dict(params.per_class or {})
        self.order = tuple(params.order) if params.order is not None else None

    def _order(self, ctx: SelectionContext) -> list[str]:
        views = allowed_views(ctx)
        if self.order is not None:
            ok = {v.name for v in views}
            return [m for m in self.order if m in ok]
        views.sort(
            key=lambda v: (
                v.cost_per_call,
                v.latency_s if v.latency_s is not None else math.inf,
                v.name,
            )
        )
        return [v.name for v in views]

    def confident(self, answers: Sequence[MemberAnswer]) -> bool:
        """Whether every row's confidence reaches its (per predicted class) threshold."""
        winner, confidence = mean_top_confidence([a.probabilities for a in answers])
        return all(
            float(c) >= self.per_class.get(int(w), self.threshold)
            for w, c in zip(winner, confidence, strict=True)
        )

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str, ...], Any]:
        order = self._order(ctx)
        if answers and self.confident(answers):
            return (), state
        # Asked includes members that failed: escalation moves past them too (failover).
        tried = {a.member for a in answers} | set(ctx.asked)
        furthest = max((i for i, m in enumerate(order) if m in tried), default=-1)
        rest = [m for m in not_yet_asked(order[furthest + 1 :], answers) if m not in tried]
        return tuple(rest[:1]), state
