"""Selection policy `slo_greedy`: the most accurate member set that fits deadline and budget."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import MemberAnswer, MemberView, SelectionContext
from policies.ensemble_math import estimated_accuracy
from policies.registry import register
from policies.selection import Stateless, allowed_views, not_yet_asked


class SloGreedyParams(BaseModel):
    """Params of `slo_greedy`."""

    model_config = ConfigDict(extra="forbid")

    safety_factor: float = Field(
        default=1.2,
        ge=1.0,
        description="A set fits the deadline when its slowest member's latency_s times this "
        "is within the time left.",
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


class _Candidate:
    """One member set with its predicted accuracy, cost and latency."""

    __slots__ = ("accuracy", "cost", "latency_s", "members")

    def __init__(self, members: tuple[MemberView, ...], accuracy: float) -> None:
        self.members = members
        self.accuracy = accuracy
        self.cost = sum(m.cost_per_call for m in members)
        # Members run concurrently, so the set is as slow as its slowest member; an unknown
        # latency counts as 0 (no profile yet: let it run and be measured).
        self.latency_s = max((m.latency_s or 0.0 for m in members), default=0.0)

    def accuracy_key(self) -> tuple[float, float, float, int]:
        return (-self.accuracy, self.cost, self.latency_s, len(self.members))

    def cost_key(self) -> tuple[float, float, float, int]:
        return (self.cost, -self.accuracy, self.latency_s, len(self.members))


@register("selection", "slo_greedy", params=SloGreedyParams)
class SloGreedy(Stateless):
    """Ask, at once, the member set with the best expected accuracy that fits the contract.

    A set fits when its predicted latency (slowest member, times ``safety_factor``) is within
    ``ctx.remaining_s`` and its cost (sum of ``cost_per_call``) within ``contract.max_cost``.
    Expected accuracy is exact from ``ctx.validation`` (mean-probability ensemble of the set,
    cached per subset) else ``fallback_accuracy``. Sets are enumerated exactly up to
    ``exact_limit`` members, grown greedily beyond. When no set fits, the cheapest then fastest
    single member is asked and the runtime reports the violation; when none meets
    ``min_accuracy``, the best available is asked likewise.
    """

    def __init__(self, params: SloGreedyParams) -> None:
        self.params = params

    def _fits(self, c: _Candidate, ctx: SelectionContext) -> bool:
        budget = ctx.contract.max_cost
        if budget is not None and c.cost > budget + 1e-12:
            return False
        return ctx.remaining_s is None or c.latency_s * self.params.safety_factor <= ctx.remaining_s

    def _candidate(self, members: tuple[MemberView, ...], ctx: SelectionContext) -> _Candidate:
        accuracy = estimated_accuracy(members, ctx.validation, self.params.fallback_accuracy)
        return _Candidate(members, accuracy)

    def _best(self, feasible: list[_Candidate], ctx: SelectionContext) -> _Candidate:
        floor = ctx.contract.min_accuracy
        if self.params.prefer == "cost" and floor is not None:
            meeting = [c for c in feasible if c.accuracy >= floor]
            if meeting:
                return min(meeting, key=_Candidate.cost_key)
        return min(feasible, key=_Candidate.accuracy_key)

    def _exact(self, views: list[MemberView], ctx: SelectionContext) -> list[_Candidate]:
        budget = math.inf if ctx.contract.max_cost is None else ctx.contract.max_cost + 1e-12
        limit_s = math.inf if ctx.remaining_s is None else ctx.remaining_s
        factor = self.params.safety_factor
        feasible: list[_Candidate] = []
        for size in range(1, len(views) + 1):
            for combo in itertools.combinations(views, size):
                # Cost and latency are cheap; accuracy (a validation pass) only for sets that fit.
                if sum(m.cost_per_call for m in combo) > budget:
                    continue
                if max(m.latency_s or 0.0 for m in combo) * factor > limit_s:
                    continue
                feasible.append(self._candidate(combo, ctx))
        return feasible

    def _greedy(self, views: list[MemberView], ctx: SelectionContext) -> list[_Candidate]:
        singles = [c for v in views if self._fits(c := self._candidate((v,), ctx), ctx)]
        if not singles:
            return []
        current = self._best(singles, ctx)
        path = [current]
        unused = [v for v in views if v not in current.members]
        while unused:
            grown = [
                c
                for v in unused
                if self._fits(c := self._candidate((*current.members, v), ctx), ctx)
            ]
            if not grown:
                break
            step = min(grown, key=_Candidate.accuracy_key)
            if step.accuracy <= current.accuracy:
                break
            current = step
            path.append(current)
            unused = [v for v in unused if v not in current.members]
        return path

    def choose(self, ctx: SelectionContext) -> tuple[str, ...]:
        """The chosen set's member names (empty when no member is available)."""
        views = allowed_views(ctx)
        if not views:
            return ()
        if len(views) <= self.params.exact_limit:
            feasible = self._exact(views, ctx)
        else:
            feasible = self._greedy(views, ctx)
        if not feasible:
            cheapest = min(
                views,
                key=lambda v: (
                    v.cost_per_call,
                    v.latency_s if v.latency_s is not None else math.inf,
                    v.name,
                ),
            )
            return (cheapest.name,)
        return tuple(m.name for m in self._best(feasible, ctx).members)

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str, ...], Any]:
        if answers:
            return (), state
        return not_yet_asked(self.choose(ctx), answers, ctx.asked), state
