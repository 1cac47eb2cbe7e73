"""Autoscaling policies: how many replicas each member placement should have, decided purely.

The control loop (``ensemble/control/loop.py``) calls ``decide(context, state)`` on its own interval
with a window of load per placement and gets back a target per placement and the reason, plus
the state for the next call (the policy keeps none on ``self``), so a policy is a function of
its inputs, testable in virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from policies.base import PlacementLoad, ScalingContext, ScalingDecision
from policies.registry import register

__all__ = [
    "Capacity",
    "CapacityParams",
    "SloFeedback",
    "SloFeedbackParams",
    "TargetInflight",
    "TargetInflightParams",
]

Key = tuple[str, str]
EPS = 1e-9


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


# Shared pieces of the policies below.


def clamp_to_bounds(n: int, load: PlacementLoad) -> int:
    return min(load.max_replicas, max(load.min_replicas, n))


def replica_throughput_rps(load: PlacementLoad) -> float | None:
    """INFaaS's per-replica throughput at batch 1, 1000 / service_ms; the p95 stands in when
    the idle latency is unknown (slower, so a conservative estimate); None when neither is."""
    for ms in (load.service_ms, load.p95_ms):
        if ms is not None and ms > 0:
            return 1000.0 / ms
    return None


def cap_tiers(ctx: ScalingContext, targets: dict[Key, int]) -> dict[Key, str]:
    """Trim ``targets`` (one per placement) in place until every capped tier's replicas fit
    its cap: the placement that grows most gives one back first, then the largest, never
    below its minimum. Returns a note per trimmed placement."""
    loads = {load.key: load for load in ctx.placements}
    notes: dict[Key, str] = {}
    for tier, cap in ctx.tier_max_replicas.items():
        keys = sorted(k for k in targets if k[1] == tier)
        total = sum(targets[k] for k in keys)
        while total > cap:
            over = [k for k in keys if targets[k] > loads[k].min_replicas]
            if not over:
                break  # the minimums alone exceed the cap: bounds win
            key = max(over, key=lambda k: (targets[k] - loads[k].replicas, targets[k], k))
            targets[key] -= 1
            total -= 1
            notes[key] = f"{tier} tier cap {cap} replicas"
    return notes


def changed_targets(
    ctx: ScalingContext, targets: Mapping[Key, int], reasons: Mapping[Key, str]
) -> ScalingDecision:
    """The decision: only the placements whose count changes."""
    now = {load.key: load.replicas for load in ctx.placements}
    moved = {k: n for k, n in targets.items() if n != now[k]}
    return ScalingDecision(moved, {k: reasons.get(k, "") for k in moved})


@dataclass(frozen=True, slots=True)
class Wish:
    """A change wanted in one direction (+1 up, -1 down) continuously since ``since_s``."""

    direction: int
    since_s: float


def hold_wish(wish: Wish | None, direction: int, now_s: float) -> Wish:
    """The wish kept if it points the same way (its delay keeps running), else a new one.
    Keyed by direction, not by count: a noisy load that wants 5, then 6, then 5 replicas
    still matures."""
    return wish if wish is not None and wish.direction == direction else Wish(direction, now_s)


# capacity: INFaaS.


class CapacityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    headroom: float = Field(
        1.2, ge=1.0, le=10.0, description="Plan for this multiple of the arrival rate."
    )
    max_utilization: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="Share of its idle throughput (1000 / service_ms) a replica is planned "
        "to carry; below 1 when queueing makes replicas slower under load.",
    )
    downscale_after: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Consecutive decisions that must find fewer replicas enough before "
        "removing any (INFaaS's rule for CPU replicas).",
    )
    upscale_delay_s: float = Field(
        0.0, ge=0, le=3600, description="How long more replicas must be wanted before adding."
    )


@dataclass(frozen=True, slots=True)
class _CapacityMark:
    low_signals: int = 0
    """Consecutive decisions that found fewer replicas enough."""
    up_since_s: float | None = None
    """Since when more replicas have been wanted."""


@register("autoscaling", "capacity", params=CapacityParams)
class Capacity:
    """INFaaS (ATC 2021): replicas = ceil(rate x headroom / per-replica throughput), added at once
    and removed only after ``downscale_after`` consecutive low signals.

    A replica serves T = 1000 / service_ms calls per second (batch 1; the p95 stands in when
    the idle latency is unknown; a placement with neither is left alone). Over capacity it adds
    ceil((rate x headroom - n x T) / T) replicas, i.e. it targets ceil(rate x headroom / T);
    under, it waits for the low signal to repeat so one quiet window does not shrink it."""

    def __init__(self, params: CapacityParams) -> None:
        self.params = params

    def initial_state(self) -> dict[Key, _CapacityMark]:
        return {}

    def decide(
        self, ctx: ScalingContext, state: dict[Key, _CapacityMark]
    ) -> tuple[ScalingDecision, dict[Key, _CapacityMark]]:
        p = self.params
        targets = {load.key: load.replicas for load in ctx.placements}
        reasons: dict[Key, str] = {}
        marks: dict[Key, _CapacityMark] = {}
        for load in ctx.placements:
            key, n = load.key, load.replicas
            idle = replica_throughput_rps(load)
            if idle is None:
                continue  # no latency seen yet: nothing to size by
            per = idle * p.max_utilization
            planned = load.arrival_rps * p.headroom
            needed = math.ceil(planned / per - EPS)
            wanted = clamp_to_bounds(needed, load)
            why = (
                f"{load.arrival_rps:.1f} req/s x{p.headroom:g} = {planned:.1f} req/s at "
                f"{per:.1f} req/s per replica needs {needed} (bounds "
                f"{load.min_replicas}-{load.max_replicas})"
            )
            mark = state.get(key, _CapacityMark())
            if wanted > n:
                since = mark.up_since_s if mark.up_since_s is not None else ctx.now_s
                if ctx.now_s - since >= p.upscale_delay_s:
                    targets[key] = wanted
                    reasons[key] = (
                        f"{why}: +{wanted - n} = ceil(({planned:.1f} - {n} x {per:.1f}) "
                        f"/ {per:.1f})"
                    )
                else:
                    marks[key] = _CapacityMark(0, since)
            elif wanted < n:
                low = mark.low_signals + 1
                if low >= p.downscale_after:
                    targets[key] = wanted
                    reasons[key] = f"{why}: {low} consecutive low signals"
                else:
                    marks[key] = _CapacityMark(low, None)
        for key, note in cap_tiers(ctx, targets).items():
            reasons[key] = f"{reasons.get(key, 'kept')}; trimmed to the {note}"
        return changed_targets(ctx, targets, reasons), marks


# slo_feedback: tail latency and error budget.


class SloFeedbackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p95_slo_ms: float = Field(
        100.0, gt=0, le=600_000, description="p95 latency each placement's calls should stay under."
    )
    error_budget: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Share of calls allowed to fail; failing faster than that (burn rate "
        "failures / calls / error_budget over 1) adds replicas.",
    )
    scale_up_step: int = Field(
        4,
        ge=1,
        le=256,
        description="Most replicas added by one decision; the step is ceil(n x (miss - 1)), "
        "at least 1, where miss is the larger of p95 / SLO and the burn rate.",
    )
    low_water: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Remove a replica only while p95 and the burn rate are under this "
        "fraction of the SLO and of the budget.",
    )
    low_inflight_per_replica: float = Field(
        1.0,
        gt=0,
        le=10_000,
        description="... and the calls in flight would be at most this many per replica with "
        "one replica fewer.",
    )
    upscale_delay_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="How long the SLO or budget must be missed before adding, and the pause "
        "between two additions (the window still holds the latency from before).",
    )
    downscale_delay_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="How long a placement must be quiet before removing one, and between two "
        "removals.",
    )


@register("autoscaling", "slo_feedback", params=SloFeedbackParams)
class SloFeedback:
    """Feedback on the tail: add replicas while p95 misses the SLO or failures burn the error
    budget, remove one at a time when latency, failures and load are all well under.

    The step up is proportional to the miss: with n replicas and p95 at 1.5x the SLO it adds
    ceil(n x 0.5), at least 1 and at most ``scale_up_step`` (so a placement that doubles its
    latency roughly doubles). Each change restarts its delay: the window must refill with
    calls served by the new replica count before the next step, which keeps the loop from
    overshooting on stale latency."""

    def __init__(self, params: SloFeedbackParams) -> None:
        self.params = params

    def initial_state(self) -> dict[Key, Wish]:
        return {}

    def decide(
        self, ctx: ScalingContext, state: dict[Key, Wish]
    ) -> tuple[ScalingDecision, dict[Key, Wish]]:
        p = self.params
        targets = {load.key: load.replicas for load in ctx.placements}
        reasons: dict[Key, str] = {}
        wishes: dict[Key, Wish] = {}
        for load in ctx.placements:
            key, n = load.key, load.replicas
            latency = load.p95_ms / p.p95_slo_ms if load.p95_ms is not None else 0.0
            # Failed calls are among the calls started: a ratio above 1 is a sampling artefact.
            failing = (
                min(1.0, load.failures_rps / load.arrival_rps) if load.arrival_rps > 0 else 0.0
            )
            burn = failing / p.error_budget
            seen = (
                f"p95 {load.p95_ms:.0f} ms vs SLO {p.p95_slo_ms:g} ms"
                if load.p95_ms is not None
                else "no calls"
            )
            seen += f", error-budget burn {burn:.1f}"
            if (latency > 1 or burn > 1) and n < load.max_replicas:
                miss = max(latency, burn)
                grow = n * (min(miss, 1e6) - 1)  # bounded: a ratio of tiny rates can be huge
                step = min(p.scale_up_step, max(1, math.ceil(grow - EPS)))
                wanted, direction, delay = clamp_to_bounds(n + step, load), 1, p.upscale_delay_s
                why = f"{seen}: {miss:.2f}x over -> +{wanted - n}"
            elif (
                n > load.min_replicas
                and latency < p.low_water
                and burn < p.low_water
                and load.outstanding / max(1, n - 1) <= p.low_inflight_per_replica
            ):
                wanted, direction, delay = n - 1, -1, p.downscale_delay_s
                why = (
                    f"{seen}, {load.outstanding:.1f} in flight: under {p.low_water:g} of "
                    "SLO and budget -> -1"
                )
            else:
                continue  # in band: any pending wish is forgotten
            wish = hold_wish(state.get(key), direction, ctx.now_s)
            waited = ctx.now_s - wish.since_s
            if waited >= delay:
                targets[key] = wanted
                reasons[key] = f"{why} (bounds {load.min_replicas}-{load.max_replicas})"
                wish = Wish(direction, ctx.now_s)  # the next step waits for a fresh window
            wishes[key] = wish
        for key, note in cap_tiers(ctx, targets).items():
            reasons[key] = f"{reasons.get(key, 'kept')}; trimmed to the {note}"
        return changed_targets(ctx, targets, reasons), wishes


# r3e: elasticity, reliability, resilience and cost, per member across tiers.
