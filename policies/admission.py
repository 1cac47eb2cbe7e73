"""Admission control: how many requests run at once, how many may wait, and whom to shed.

A pure decision over a snapshot of the gate (requests running, priorities waiting); the
runtime (``ensemble.admission``) holds the queue and does the waiting. Priorities follow the
request contract: lower is more important, 0 (the default) most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from policies.registry import register

__all__ = ["AdmissionDecision", "AdmissionPolicy", "Bounded", "BoundedParams", "GateView"]


@dataclass(frozen=True, slots=True)
class GateView:
    """The gate when a request arrives: requests running, and the priorities waiting, oldest
    first."""

    running: int
    waiting: Sequence[int]


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """``run`` now, ``wait`` in the queue, or ``shed`` the newcomer. ``evict`` names a waiting
    request (its index in ``GateView.waiting``) to shed to make room for the newcomer."""

    action: Literal["run", "wait", "shed"]
    evict: int | None = None
    reason: str = ""


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Admits, queues or sheds each request, and picks the next waiting one to run."""

    retry_after_s: float
    """What a shed request's ``Retry-After`` says."""

    def admit(self, gate: GateView, priority: int) -> AdmissionDecision:
        """What to do with a request of ``priority`` arriving at ``gate``."""
        ...

    def next_to_run(self, gate: GateView) -> int | None:
        """Index of the waiting request to start now (a slot is free), or None."""
        ...


class BoundedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_running: int = Field(
        64, ge=1, le=100_000, description="Requests processed at once; more wait in the queue."
    )
    max_waiting: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Requests that may wait for a slot; beyond it the least important is shed.",
    )
    retry_after_s: float = Field(
        1.0, ge=0, le=3600, description="`Retry-After` of a shed request, in seconds."
    )


@register("admission", "bounded", params=BoundedParams)
class Bounded:
    """At most ``max_running`` requests at once and ``max_waiting`` waiting; when the queue is
    full, the least important request (the highest priority number, the newest among equals)
    is shed: the newcomer itself, or a waiting one it outranks. Waiting requests start in
    priority order, oldest first among equals. Never queues without bound."""

    def __init__(self, params: BoundedParams) -> None:
        self.params = params
        self.retry_after_s = params.retry_after_s

    def admit(self, gate: GateView, priority: int) -> AdmissionDecision:
        p = self.params
        if gate.running < p.max_running and not gate.waiting:
            return AdmissionDecision("run")
        if len(gate.waiting) < p.max_waiting:
            return AdmissionDecision("wait")
        full = f"{gate.running} requests running and {len(gate.waiting)} waiting (the most)"
        if not gate.waiting:
            return AdmissionDecision("shed", reason=full)
        worst = _least_important(gate.waiting)
        if priority < gate.waiting[worst]:
            return AdmissionDecision(
                "wait", evict=worst, reason=f"{full}; a priority-{priority} request came"
            )
        return AdmissionDecision("shed", reason=full)

    def next_to_run(self, gate: GateView) -> int | None:
        if not gate.waiting or gate.running >= self.params.max_running:
            return None
        return min(range(len(gate.waiting)), key=lambda i: (gate.waiting[i], i))


def _least_important(waiting: Sequence[int]) -> int:
    """The waiting request to shed first: the highest priority number, the newest among equals."""
    return max(range(len(waiting)), key=lambda i: (waiting[i], i))
