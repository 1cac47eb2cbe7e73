"""Autoscaling policies: how many replicas each member placement should have, decided purely.

The control loop (``ensemble/control.py``) calls ``decide(context, state)`` on its own interval
with a window of load per placement and gets back a target per placement and the reason, plus
the state for the next call (the policy keeps none on ``self``), so a policy is a function of
its inputs, testable in virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from policies.registry import register

__all__ = [
    "AutoscalingPolicy",
    "PlacementLoad",
    "ScalingContext",
    "ScalingDecision",
    "TargetInflight",
    "TargetInflightParams",
]


@dataclass(frozen=True, slots=True)
class PlacementLoad:
    """One member placement over the last window."""

    member: str
    tier: str
    replicas: int
    """Replicas it has now (ready or not)."""
    min_replicas: int
    max_replicas: int
    outstanding: float
    """Calls in flight to its replicas, averaged over the window."""
    arrival_rps: float
    """Calls started per second over the window."""
    p95_ms: float | None
    """Recent p95 latency of its replicas' calls (None before any call)."""
    ready_replicas: int | None = None
    """Replicas that take calls now (failed, unhealthy or still starting ones do not); None:
    the same as ``replicas``."""
    failures_rps: float = 0.0
    """Failed calls per second over the window."""
    service_ms: float | None = None
    """One call's latency on an idle replica (the member card's batch-1 p50, else the
    replicas' latency EWMA): INFaaS's per-replica throughput is 1000 / service_ms."""
    cost_per_replica_hour: float = 0.0
    """The tier's price of one replica for one hour."""
    other_tiers: tuple[str, ...] = ()
    """The member's other tiers (where its calls go when this one has no replica)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.member, self.tier)

    @property
    def ready(self) -> int:
        return self.replicas if self.ready_replicas is None else self.ready_replicas


@dataclass(frozen=True, slots=True)
class ScalingContext:
    now_s: float
    placements: tuple[PlacementLoad, ...]
    tier_max_replicas: Mapping[str, int] = field(default_factory=dict)
    """Tiers with a cap on replicas across all their members (`tiers.NAME.max_replicas`)."""


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """Target replicas per (member, tier) and why; a placement left out keeps its count."""

    targets: Mapping[tuple[str, str], int] = field(default_factory=dict)
    reasons: Mapping[tuple[str, str], str] = field(default_factory=dict)


@runtime_checkable
class AutoscalingPolicy(Protocol):
    def initial_state(self) -> Any: ...

    def decide(self, ctx: ScalingContext, state: Any) -> tuple[ScalingDecision, Any]: ...


class TargetInflightParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_ongoing_requests: float = Field(
        2.0, gt=0, le=10_000, description="Calls in flight each replica should carry."
    )
    upscale_delay_s: float = Field(
        3.0, ge=0, le=3600, description="How long more replicas must be wanted before adding."
    )
    downscale_delay_s: float = Field(
        30.0, ge=0, le=86_400, description="How long fewer must be wanted before removing."
    )


@register("autoscaling", "target_inflight", params=TargetInflightParams)
class TargetInflight:
    """Ray Serve's default rule: ceil(calls in flight / target_ongoing_requests) replicas,
    within the placement's bounds, changed only after the wish has held for the up- or
    downscale delay (hysteresis against noise)."""

    def __init__(self, params: TargetInflightParams) -> None:
        self.params = params

    def initial_state(self) -> dict[tuple[str, str], tuple[int, float]]:
        """Per placement: the count wanted and since when it has been wanted."""
        return {}

    def decide(
        self, ctx: ScalingContext, state: dict[tuple[str, str], tuple[int, float]]
    ) -> tuple[ScalingDecision, dict[tuple[str, str], tuple[int, float]]]:
        p = self.params
        targets: dict[tuple[str, str], int] = {}
        reasons: dict[tuple[str, str], str] = {}
        wishes: dict[tuple[str, str], tuple[int, float]] = {}
        for load in ctx.placements:
            key = (load.member, load.tier)
            raw = math.ceil(load.outstanding / p.target_ongoing_requests - 1e-9)
            wanted = min(load.max_replicas, max(load.min_replicas, raw))
            if wanted == load.replicas:
                continue  # nothing wanted: any pending wish is forgotten
            before, since = state.get(key, (wanted, ctx.now_s))
            since = since if before == wanted else ctx.now_s
            wishes[key] = (wanted, since)
            delay = p.upscale_delay_s if wanted > load.replicas else p.downscale_delay_s
            if ctx.now_s - since >= delay:
                targets[key] = wanted
                reasons[key] = (
                    f"{load.outstanding:.1f} calls in flight / target "
                    f"{p.target_ongoing_requests:g} per replica -> {wanted} "
                    f"(bounds {load.min_replicas}-{load.max_replicas}), wanted for "
                    f"{ctx.now_s - since:.0f} s"
                )
        return ScalingDecision(targets, reasons), wishes
