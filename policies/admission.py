"""Admission control: how many requests run at once, how many may wait, and whom to shed.

A pure decision over a snapshot of the gate (requests running, priorities waiting); the
runtime (``ensemble.dataplane.admission``) holds the queue and does the waiting. Priorities
follow the request contract: lower is more important, 0 (the default) most. ``adaptive`` also
moves its limit with measured service time: the gate keeps its ``LimitState`` and feeds it
windows of finished requests' service times (``update(state, window) -> state``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.base import AdmissionDecision, GateView, LatencyWindow, LimitState
from policies.registry import register

__all__ = ["Adaptive", "AdaptiveParams", "Bounded", "BoundedParams"]


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
        return _admit(gate, priority, self.params.max_running, self.params.max_waiting)

    def next_to_run(self, gate: GateView) -> int | None:
        return _next_to_run(gate, self.params.max_running)


class AdaptiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_limit: int = Field(
        16, ge=1, le=100_000, description="Requests processed at once before anything finished."
    )
    min_limit: int = Field(
        16,
        ge=1,
        le=100_000,
        description="The limit never goes below this many requests. A floor keeps a saturated "
        "but not overloaded gateway (a closed-loop client's 32 connections) from shedding: "
        "service time measured under load is then compared with one measured idle.",
    )
    max_limit: int = Field(
        256, ge=1, le=100_000, description="The limit never goes above this many requests."
    )
    tolerance: float = Field(
        1.5,
        ge=1,
        le=100,
        description="How many times the baseline service time recent requests may take before "
        "the limit shrinks (Gradient2's rtt tolerance).",
    )
    headroom: float | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Requests added to the limit at every update (Gradient2's queue size): the "
        "step it grows by while latency stays near the baseline. Default: the square root of "
        "the limit.",
    )
    smoothing: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Weight of each update's new limit against the old one (1: no smoothing).",
    )
    baseline_doubling_s: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="How fast the baseline may rise toward slower recent service times: at "
        "most doubling in this many seconds. It falls to a faster one at once (a minimum that "
        "slowly forgets), so it tracks the service time of a lightly loaded gateway.",
    )
    window_requests: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Finished requests per update of the limit (the short window).",
    )
    window_ms: float = Field(
        100.0,
        gt=0,
        le=60_000,
        description="Update the limit at least this often, in milliseconds, while requests "
        "finish (fewer than `window_requests` of them).",
    )
    waiting_per_limit: float = Field(
        1.0,
        ge=0,
        le=1_000,
        description="Requests that may wait for a slot, per request of the limit (rounded "
        "up); beyond it the least important is shed.",
    )
    retry_after_s: float = Field(
        1.0, ge=0, le=3600, description="`Retry-After` of a shed request, in seconds."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(
                f"need min_limit <= initial_limit <= max_limit, got {self.min_limit}, "
                f"{self.initial_limit}, {self.max_limit}"
            )
        return self


@register("admission", "adaptive", params=AdaptiveParams)
class Adaptive:
    """Like ``bounded``, but ``max_running`` adapts to measured service time (Netflix's
    Gradient2, Envoy's adaptive concurrency): it shrinks while recent requests run slower than
    ``tolerance`` times the baseline, grows by ``headroom`` while they do not, and
    ``max_waiting`` follows it. Sheds the least important request first, as ``bounded``."""

    def __init__(self, params: AdaptiveParams) -> None:
        self.params = params
        self.retry_after_s = params.retry_after_s
        self.window_requests = params.window_requests
        self.window_s = params.window_ms / 1e3

    def _limits(self, gate: GateView) -> tuple[int, int]:
        limit = self.params.initial_limit if gate.limit is None else gate.limit
        running = max(self.params.min_limit, int(limit))
        return running, math.ceil(limit * self.params.waiting_per_limit)

    def admit(self, gate: GateView, priority: int) -> AdmissionDecision:
        return _admit(gate, priority, *self._limits(gate))

    def next_to_run(self, gate: GateView) -> int | None:
        return _next_to_run(gate, self._limits(gate)[0])

    def start(self, previous: LimitState | None, now_s: float) -> LimitState:
        if previous is None:
            return LimitState(float(self.params.initial_limit), updated_s=now_s)
        return replace(previous, limit=self._clamp(previous.limit), updated_s=now_s)

    def update(self, state: LimitState, window: LatencyWindow) -> LimitState:
        if not window.service_s:
            return state
        p = self.params
        recent = _median(window.service_s)
        if state.baseline_s <= 0:
            baseline = recent
        else:
            elapsed = max(0.0, window.now_s - state.updated_s)
            baseline = min(recent, state.baseline_s * 2 ** (elapsed / p.baseline_doubling_s))
        gradient = min(1.0, max(0.5, p.tolerance * baseline / recent)) if recent > 0 else 1.0
        limit = state.limit
        if gradient < 1 or window.peak_running >= limit / 2:
            # Only grow a limit that is being used: an idle gateway says nothing about more.
            headroom = math.sqrt(limit) if p.headroom is None else p.headroom
            limit = (1 - p.smoothing) * limit + p.smoothing * (limit * gradient + headroom)
        return LimitState(self._clamp(limit), baseline, recent, window.now_s)

    def _clamp(self, limit: float) -> float:
        return min(float(self.params.max_limit), max(float(self.params.min_limit), limit))


def _admit(gate: GateView, priority: int, max_running: int, max_waiting: int) -> AdmissionDecision:
    if gate.running < max_running and not gate.waiting:
        return AdmissionDecision("run")
    if len(gate.waiting) < max_waiting:
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


def _next_to_run(gate: GateView, max_running: int) -> int | None:
    if not gate.waiting or gate.running >= max_running:
        return None
    return min(range(len(gate.waiting)), key=lambda i: (gate.waiting[i], i))


def _least_important(waiting: Sequence[int]) -> int:
    """The waiting request to shed first: the highest priority number, the newest among equals."""
    return max(range(len(waiting)), key=lambda i: (waiting[i], i))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
