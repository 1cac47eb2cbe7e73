"""Routing policies: the order in which one member's replicas are tried for a call."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import ReplicaView, RoutingContext
from policies.registry import NoParams, register

__all__ = [
    "PeakEwmaParams",
    "PeakEwmaRouter",
    "PowerOfTwoRouter",
    "RoundRobinRouter",
    "TierPreferenceParams",
    "TierPreferenceRouter",
    "decayed_latency_s",
    "eligible",
    "p2c_order",
]

LATENCY_DECAY_S = 10.0
"""Time constant with which an unmeasured replica's latency EWMA fades, for p2c (Finagle's and
tower's peak-EWMA default)."""


def eligible(replicas: Sequence[ReplicaView], ctx: RoutingContext) -> list[ReplicaView]:
    """Replicas a call may go to: ready, not ejected, on a tier the context allows."""
    return [
        r
        for r in replicas
        if r.ready and not r.ejected and (ctx.tier is None or r.tier == ctx.tier)
    ]


def decayed_latency_s(replica: ReplicaView, decay_s: float) -> float | None:
    """The replica's latency EWMA, faded toward 0 by ``exp(-age / decay_s)`` with the time since
    it was last measured (Finagle's and Linkerd's peak EWMA): a replica that was slow once and
    has had no call since comes to look fast again and is tried, so one slow moment does not
    starve it for good when load is too low for outstanding calls to send traffic its way."""
    latency = replica.latency_ewma_s
    age = replica.latency_age_s
    if latency is None or not age:
        return latency
    return latency * math.exp(-age / decay_s)


def _load_key(replica: ReplicaView) -> tuple[int, float]:
    # Unknown latency counts as 0 so a fresh replica wins ties and gets the traffic that
    # measures it; otherwise it would never earn an EWMA.
    return replica.outstanding, decayed_latency_s(replica, LATENCY_DECAY_S) or 0.0


def p2c_order(candidates: Sequence[ReplicaView], rng: random.Random) -> list[ReplicaView]:
    """Full preference order by repeated power-of-two draws among the replicas not yet placed.

    Each position is a fresh draw of two, the one with fewer outstanding calls (then lower
    latency EWMA, faded with its age: ``decayed_latency_s``) wins; so fallbacks are load-aware
    too, and no replica is chosen by every router at once the way a global "least loaded" sort
    would herd them.
    """
    pool = list(candidates)
    order: list[ReplicaView] = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        # Strict comparison keeps the first sampled on ties: the draw already made it random.
        best = j if _load_key(pool[j]) < _load_key(pool[i]) else i
        order.append(pool.pop(best))
    order.extend(pool)
    return order


def _names(replicas: Sequence[ReplicaView]) -> tuple[str, ...]:
    return tuple(r.name for r in replicas)


@register("routing", "round_robin")
class RoundRobinRouter:
    """Rotate through the eligible replicas, one step per call."""

    def __init__(self, params: NoParams) -> None:
        del params
        # The one piece of state kept on a policy instance: where the rotation stands is not
        # semantically important (losing it on reload only restarts the rotation), so it is not
        # worth threading through the caller like real policy state.
        self._calls = 0

    def route(
        self, replicas: Sequence[ReplicaView], ctx: RoutingContext, rng: random.Random
    ) -> tuple[str, ...]:
        del rng
        # Sorting by name makes the rotation independent of the order the pool lists replicas.
        ready = sorted(eligible(replicas, ctx), key=lambda r: r.name)
        if not ready:
            return ()
        start = self._calls % len(ready)
        self._calls += 1
        return _names(ready[start:] + ready[:start])


@register("routing", "p2c")
class PowerOfTwoRouter:
    """Power of two choices (Ray Serve's default): of two sampled replicas, the less loaded."""

    def __init__(self, params: NoParams) -> None:
        del params

    def route(
        self, replicas: Sequence[ReplicaView], ctx: RoutingContext, rng: random.Random
    ) -> tuple[str, ...]:
        return _names(p2c_order(eligible(replicas, ctx), rng))


class PeakEwmaParams(BaseModel):
    """Params of the ``peak_ewma`` router."""

    model_config = ConfigDict(extra="forbid")

    unknown_latency_s: float = Field(
        default=0.001,
        gt=0.0,
        description=(
            "Latency assumed for a replica with no EWMA yet; small (optimistic) so new replicas "
            "get probed, but above zero so their outstanding calls still count."
        ),
    )
    decay_s: float = Field(
        default=LATENCY_DECAY_S,
        gt=0.0,
        description=(
            "Time constant with which a replica's latency EWMA fades toward 0 while it gets no "
            "call, so that a replica slow once is tried again rather than starved."
        ),
    )


@register("routing", "peak_ewma", params=PeakEwmaParams)
class PeakEwmaRouter:
    """Peak-EWMA (Finagle/Linkerd): lowest latency EWMA (faded with its age) times
    (outstanding + 1) first."""

    def __init__(self, params: PeakEwmaParams) -> None:
        self.params = params

    def cost(self, replica: ReplicaView) -> float:
        """Expected wait at this replica: its latency weighted by the queue in front of a call."""
        latency = decayed_latency_s(replica, self.params.decay_s)
        if latency is None:
            latency = self.params.unknown_latency_s
        return latency * (replica.outstanding + 1)

    def route(
        self, replicas: Sequence[ReplicaView], ctx: RoutingContext, rng: random.Random
    ) -> tuple[str, ...]:
        ready = eligible(replicas, ctx)
        # Shuffle before the stable sort so equal costs are broken at random, not by pool order.
        rng.shuffle(ready)
        ready.sort(key=self.cost)
        return _names(ready)


class TierPreferenceParams(BaseModel):
    """Params of the ``tier_preference`` router."""

    model_config = ConfigDict(extra="forbid")

    max_outstanding: int = Field(
        default=8,
        ge=1,
        description=(
            "A tier is saturated when every eligible replica on it has at least this many "
            "outstanding calls; saturated tiers spill over to the next tier in tier_order."
        ),
    )


@register("routing", "tier_preference", params=TierPreferenceParams)
class TierPreferenceRouter:
    """Nearest tier first (ctx.tier_order), p2c within a tier, spill over when it is saturated."""

    def __init__(self, params: TierPreferenceParams) -> None:
        self.params = params

    def route(
        self, replicas: Sequence[ReplicaView], ctx: RoutingContext, rng: random.Random
    ) -> tuple[str, ...]:
        by_tier: dict[str, list[ReplicaView]] = {}
        for r in eligible(replicas, ctx):
            by_tier.setdefault(r.tier, []).append(r)
        # A tier with no eligible replica has no group at all, which is the "none ready" spill.
        rank = _tier_rank(ctx.tier_order)
        limit = self.params.max_outstanding

        def key(tier: str) -> tuple[bool, int, str]:
            saturated = all(r.outstanding >= limit for r in by_tier[tier])
            return saturated, rank(tier), tier

        order: list[ReplicaView] = []
        for tier in sorted(by_tier, key=key):
            order.extend(p2c_order(by_tier[tier], rng))
        return _names(order)


def _tier_rank(tier_order: Sequence[str]) -> Callable[[str], int]:
    # Tiers the order does not name still serve (as the farthest) rather than vanish: the
    # context's tier restriction, not its ordering, decides what is allowed.
    index: dict[str, int] = {}
    for i, tier in enumerate(tier_order):
        index.setdefault(tier, i)
    return lambda tier: index.get(tier, len(index))
