"""One small Protocol per policy kind; policies decide, the runtime in ``ensemble`` does I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ensemble.types import Aggregate, MemberAnswer, SelectionContext


@runtime_checkable
class SelectionPolicy(Protocol):
    """Chooses which ensemble members answer one request."""

    def select(self, ctx: SelectionContext) -> tuple[str, ...]:
        """Names of the members to ask, in preference order; never empty if any member is ready."""
        ...


@runtime_checkable
class AggregationPolicy(Protocol):
    """Combines the members' answers (possibly a partial set) into one."""

    def aggregate(self, answers: Sequence[MemberAnswer], n_classes: int) -> Aggregate:
        """Combine one or more answers, each with probabilities shaped [batch, n_classes]."""
        ...
