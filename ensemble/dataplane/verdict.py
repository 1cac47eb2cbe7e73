"""The contract check: how an ensemble's answer falls short of its request's contract, and what
a profile's `on_violation` makes of that (an error, a logged alert)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ensemble.clock import Clock
from ensemble.errors import (
    ContractUnmet,
    DeadlineExceeded,
    EnsembleError,
    InvalidInput,
    MemberFailed,
)
from ensemble.types import Contract

VIOLATION_KINDS = ("deadline", "availability", "accuracy", "cost")
_log = logging.getLogger("ensemble.contract")

Failures = Sequence[tuple[str, BaseException]]


def violations(
    contract: Contract,
    *,
    late: bool,
    failures: Failures,
    unreachable: Sequence[str],
    accuracy: float | None,
    cost: float,
) -> tuple[str, ...]:
    """How the contract is not met, in ``VIOLATION_KINDS`` order."""
    kinds: list[str] = []
    if late:
        kinds.append("deadline")
    # A member the input made fail (non-finite scores from allowed NaN input) is no sign of an
    # unavailable member; a late one is counted as `deadline`.
    if unreachable or any(not isinstance(f, DeadlineExceeded | InvalidInput) for _, f in failures):
        kinds.append("availability")
    wanted = contract.min_accuracy
    if wanted is not None and accuracy is not None and accuracy < wanted:
        kinds.append("accuracy")
    budget = contract.max_cost
    if budget is not None and cost > budget * (1 + 1e-9):
        kinds.append("cost")
    return tuple(kinds)


def detail(
    kinds: Sequence[str],
    contract: Contract,
    *,
    failures: Failures,
    unreachable: Sequence[str],
    accuracy: float | None,
    cost: float,
) -> str:
    """What each violation was, for an error message or a log line."""
    parts = []
    for kind in kinds:
        if kind == "deadline":
            parts.append("deadline: not every member answered before the request's timeout")
        elif kind == "availability":
            failed = ", ".join(sorted({n for n, _ in failures}))
            if failed:
                parts.append(f"availability: members failed: {failed}")
            if unreachable:
                parts.append(f"availability: members not ready: {', '.join(unreachable)}")
        elif kind == "accuracy":
            parts.append(
                f"accuracy: estimated {accuracy or 0.0:.4f} < min_accuracy {contract.min_accuracy}"
            )
        else:
            parts.append(f"cost: spent {cost:.6g} > max_cost {contract.max_cost}")
    return "; ".join(parts)


def rejection(kinds: Sequence[str], detail: str) -> EnsembleError:
    """The error a `reject` profile answers with: the first kind decides the status."""
    if kinds[0] == "deadline":
        return DeadlineExceeded(f"contract not met ({detail})")
    if kinds[0] == "availability":
        return MemberFailed(f"contract not met ({detail})")
    return ContractUnmet(f"contract not met ({detail})")


def no_answer(failures: Failures, late: bool) -> EnsembleError:
    """The error for a request no member answered: the client's fault, time, or members'."""
    if late and all(isinstance(f, DeadlineExceeded) for _, f in failures):
        return DeadlineExceeded("no member answered before the request's timeout")
    if all(isinstance(f, InvalidInput) for _, f in failures):
        return InvalidInput(
            "no member could answer this input: " + "; ".join(str(f) for _, f in failures)
        )
    reasons = "; ".join(f"{name}: {f}" for name, f in failures)
    return MemberFailed(f"all {len(failures)} members asked failed: {reasons}")


class Alerts:
    """`alert`: a warning per ensemble at most once a second (the counter has every one)."""

    def __init__(self, clock: Clock, every_s: float = 1.0) -> None:
        self._clock = clock
        self._every_s = every_s
        self._last: dict[str, float] = {}

    def warn(self, ensemble: str, detail: str) -> bool:
        """Log it unless this ensemble's last warning is too recent; whether it was logged."""
        now = self._clock.now()
        if now - self._last.get(ensemble, -1e18) < self._every_s:
            return False
        self._last[ensemble] = now
        _log.warning("ensemble %s: contract not met: %s", ensemble, detail)
        return True
