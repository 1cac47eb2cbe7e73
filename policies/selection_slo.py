"""Selection policy `slo_greedy`: the most accurate member set that fits deadline and budget."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import MemberAnswer, MemberView, Pick, SelectionContext
from policies.ensemble_math import estimated_accuracy
from policies.registry import register
from policies.selection import Stateless, Tail, allowed_views, not_yet_asked, placement_for


class SloGreedyParams(BaseModel):
    """Params of `slo_greedy`."""

    model_config = ConfigDict(extra="forbid")

    safety_factor: float = Field(
        default=1.2,
        ge=1.0,
        description="A set fits the deadline when its slowest member's latency (see `tail`) "
        "times this is within the time left.",
    )
    exact_limit: int = Field(
        default=10,
        ge=1,
        le=16,
        description="Enumerate every subset (2^n) up to this many members; greedy beyond.",
    )
    fallback_accuracy: Literal["max_member", "at_least_one"] = Field(
        default="max_member",
        description="Expected accuracy without validation answers: the best member's card "
        "accuracy, or ROHE's optimistic 1 - prod(1 - acc_i).",
    )
    prefer: Literal["accuracy", "cost"] = Field(
        default="accuracy",
        description="`accuracy`: the most accurate feasible set; `cost`: the cheapest feasible "
        "set that meets the contract's min_accuracy (the most accurate when none does).",
    )
    estimates: Literal["live", "card"] = Field(
        default="live",
        description="`live`: each member on the tier that fits the time left by its live "
        "latency (the tier's round trip now plus recent service times) at the lowest price; "
        "`card`: the card's offline batch-1 p50 and the first tier's price, tier left to routing.",
    )
    tail: Tail = Field(
        default="p95",
        description="Which live latency must fit (with `estimates: live`).",
    )


class _Option:
    """One member as the policy would ask it: on which tier (None: routing's choice), at what
    latency and price."""

    __slots__ = ("cost", "latency_s", "tier", "view")

    def __init__(
        self, view: MemberView, latency_s: float | None, cost: float, tier: str | None
    ) -> None:
        self.view = view
        # An unknown latency counts as 0 (no profile yet: let it run and be measured).
        self.latency_s = latency_s or 0.0
        self.cost = cost
        self.tier = tier

    def pick(self) -> str | Pick:
        return self.view.name if self.tier is None else Pick(self.view.name, self.tier)


class _Candidate:
    """One member set with its predicted accuracy, cost and latency."""

    __slots__ = ("accuracy", "cost", "latency_s", "options")

    def __init__(self, options: tuple[_Option, ...], accuracy: float) -> None:
        self.options = options
        self.accuracy = accuracy
        self.cost = sum(o.cost for o in options)
        # Members run concurrently, so the set is as slow as its slowest member.
        self.latency_s = max((o.latency_s for o in options), default=0.0)

    def accuracy_key(self) -> tuple[float, float, float, int]:
        return (-self.accuracy, self.cost, self.latency_s, len(self.options))

    def cost_key(self) -> tuple[float, float, float, int]:
        return (self.cost, -self.accuracy, self.latency_s, len(self.options))


@register("selection", "slo_greedy", params=SloGreedyParams)
class SloGreedy(Stateless):
    """Ask, at once, the member set with the best expected accuracy that fits the contract.

    Each member is first placed: with live estimates on the tier whose ``tail`` latency (times
    ``safety_factor``) fits ``ctx.remaining_s`` at the lowest price (``placement_for``), with
    card estimates at its card latency and first tier's price. A set fits when its slowest
    member's latency (times ``safety_factor``) is within the time left and its cost within
    ``contract.max_cost``. Expected accuracy is exact from ``ctx.validation`` (mean-probability
    ensemble of the set, cached per subset) else ``fallback_accuracy``. Sets are enumerated
    exactly up to ``exact_limit`` members, grown greedily beyond. When no set fits, the
    cheapest then fastest single member is asked and the runtime reports the violation; when
    none meets ``min_accuracy``, the best available is asked likewise.
    """

    def __init__(self, params: SloGreedyParams) -> None:
        self.params = params

    def _option(self, view: MemberView, ctx: SelectionContext) -> _Option:
        if self.params.estimates == "live":
            placement = placement_for(view, ctx, self.params.tail, self.params.safety_factor)
            if placement is not None:
                latency = placement.tail_s(self.params.tail)
                return _Option(view, latency, placement.cost_per_call, placement.tier)
        return _Option(view, view.latency_s, view.cost_per_call, None)

    def _fits(self, c: _Candidate, ctx: SelectionContext) -> bool:
        budget = ctx.contract.max_cost
        if budget is not None and c.cost > budget + 1e-12:
            return False
        return ctx.remaining_s is None or c.latency_s * self.params.safety_factor <= ctx.remaining_s

    def _candidate(self, options: tuple[_Option, ...], ctx: SelectionContext) -> _Candidate:
        views = tuple(o.view for o in options)
        accuracy = estimated_accuracy(views, ctx.validation, self.params.fallback_accuracy)
        return _Candidate(options, accuracy)

    def _best(self, feasible: list[_Candidate], ctx: SelectionContext) -> _Candidate:
        floor = ctx.contract.min_accuracy
        if self.params.prefer == "cost" and floor is not None:
            meeting = [c for c in feasible if c.accuracy >= floor]
            if meeting:
                return min(meeting, key=_Candidate.cost_key)
        return min(feasible, key=_Candidate.accuracy_key)

    def _exact(self, options: list[_Option], ctx: SelectionContext) -> list[_Candidate]:
        budget = math.inf if ctx.contract.max_cost is None else ctx.contract.max_cost + 1e-12
        limit_s = math.inf if ctx.remaining_s is None else ctx.remaining_s
        factor = self.params.safety_factor
        feasible: list[_Candidate] = []
        for size in range(1, len(options) + 1):
            for combo in itertools.combinations(options, size):
                # Cost and latency are cheap; accuracy (a validation pass) only for sets that fit.
                if sum(o.cost for o in combo) > budget:
                    continue
                if max(o.latency_s for o in combo) * factor > limit_s:
                    continue
                feasible.append(self._candidate(combo, ctx))
        return feasible

    def _greedy(self, options: list[_Option], ctx: SelectionContext) -> list[_Candidate]:
        singles = [c for o in options if self._fits(c := self._candidate((o,), ctx), ctx)]
        if not singles:
            return []
        current = self._best(singles, ctx)
        path = [current]
        unused = [o for o in options if o not in current.options]
        while unused:
            grown = [
                c
                for o in unused
                if self._fits(c := self._candidate((*current.options, o), ctx), ctx)
            ]
            if not grown:
                break
            step = min(grown, key=_Candidate.accuracy_key)
            if step.accuracy <= current.accuracy:
                break
            current = step
            path.append(current)
            unused = [o for o in unused if o not in current.options]
        return path

    def choose(self, ctx: SelectionContext) -> tuple[str | Pick, ...]:
        """The chosen set, each member on its tier (empty when no member is available)."""
        options = [self._option(v, ctx) for v in allowed_views(ctx)]
        if not options:
            return ()
        if len(options) <= self.params.exact_limit:
            feasible = self._exact(options, ctx)
        else:
            feasible = self._greedy(options, ctx)
        if not feasible:
            cheapest = min(options, key=lambda o: (o.cost, o.latency_s, o.view.name))
            return (cheapest.pick(),)
        return tuple(o.pick() for o in self._best(feasible, ctx).options)

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str | Pick, ...], Any]:
        if answers:
            return (), state
        return not_yet_asked(self.choose(ctx), answers, ctx.asked), state
