"""One small Protocol per policy kind; policies decide, the runtime in ``ensemble`` does I/O.

Stateful policies never keep state on ``self``: the caller holds it and passes it back
(``decide(ctx, state) -> (decision, state)``), so a policy is a pure function of its inputs,
testable in virtual time, and a hot reload can drop or carry state explicitly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ensemble.types import (
    Aggregate,
    AggregationContext,
    Feedback,
    MemberAnswer,
    ReplicaView,
    RoutingContext,
    SelectionContext,
)


@runtime_checkable
class SelectionPolicy(Protocol):
    """Chooses which ensemble members answer one request, possibly in stages.

    The runtime calls ``select`` with no answers first, asks the members it names, then calls
    again with every answer so far; an empty tuple ends the request (cascades escalate by
    naming more members; one-shot policies return ``()`` on the second call).
    """

    def initial_state(self) -> Any:
        """State before any request (e.g. bandit weights); ``None`` for stateless policies."""
        ...

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str, ...], Any]:
        """Members to ask next (never one already asked) and the new state."""
        ...

    def feedback(self, event: Feedback, state: Any) -> Any:
        """Learn from true labels joined to an earlier answer (``event.predicted``: each
        member's predicted class per row; probabilities are not kept); returns the new state."""
        ...

    def weights(self, state: Any) -> Mapping[str, float] | None:
        """Member weights learned so far (Exp4's), handed to aggregation; None if none."""
        ...


@runtime_checkable
class AggregationPolicy(Protocol):
    """Combines the members' answers (possibly a partial set) into one."""

    def aggregate(self, answers: Sequence[MemberAnswer], ctx: AggregationContext) -> Aggregate:
        """Combine one or more answers, each with probabilities shaped [batch, n_classes]."""
        ...


@runtime_checkable
class RoutingPolicy(Protocol):
    """Orders a member's replicas for one call: the first is asked, the rest are fallbacks."""

    def route(
        self, replicas: Sequence[ReplicaView], ctx: RoutingContext, rng: random.Random
    ) -> tuple[str, ...]:
        """Replica names in preference order; only ready, non-ejected ones."""
        ...
