"""Hedging policies: when a second copy of a slow call goes out, within a token budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ensemble.types import ReplicaView
from policies.base import HedgeState
from policies.registry import NoParams, register

__all__ = ["HedgeParams", "HedgePolicy", "NoHedge"]

# Budgets add up fractional tokens (0.05 twenty times is not exactly 1.0 in floating point);
# without a tolerance the twentieth primary would not quite earn its hedge.
_EPS = 1e-9


class HedgeParams(BaseModel):
    """Params of the ``percentile`` hedging policy (The Tail at Scale's hedged requests)."""

    model_config = ConfigDict(extra="forbid")

    quantile: float = Field(
        default=0.95,
        ge=0.5,
        lt=1.0,
        description=(
            "Hedge once the first call has run longer than this latency quantile of the "
            "member's healthiest replica on the tier (the lowest of its replicas' quantiles, "
            "so a slow replica does not set its own, late, hedge delay). 0.95 uses the "
            "observed p95; others are estimated (log-normal fit through the latency EWMA and "
            "the p95)."
        ),
    )
    budget: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Most hedges per first call of each member, over time (0.05: at most 5% "
        "extra calls to any member).",
    )
    burst: float = Field(
        default=10.0,
        ge=1.0,
        description="Token bucket size: hedges allowed back to back; the bucket starts full.",
    )
    min_delay_ms: float = Field(
        default=1.0,
        ge=0.0,
        description="Never hedge sooner than this, however fast the replica has been.",
    )
    max_delay_ms: float = Field(
        default=10_000.0,
        gt=0.0,
        description="Hedge no later than this, however slow the replica has been.",
    )

    @model_validator(mode="after")
    def _delays_ordered(self) -> Self:
        if self.min_delay_ms > self.max_delay_ms:
            raise ValueError("min_delay_ms must not exceed max_delay_ms")
        return self


_Z95 = NormalDist().inv_cdf(0.95)


def _latency_quantile_s(replica: ReplicaView, quantile: float) -> float | None:
    p95 = replica.latency_p95_s
    if p95 is None:
        return None
    if math.isclose(quantile, 0.95):
        return p95
    # ReplicaView carries only the EWMA and the p95. Treating latency as log-normal with the
    # EWMA as its median gives any other quantile from those two; without a spread (no EWMA,
    # or a p95 not above it) the p95 is the only honest answer.
    median = replica.latency_ewma_s
    if median is None or median <= 0.0 or p95 <= median:
        return p95
    z = NormalDist().inv_cdf(quantile)
    return median * math.exp(math.log(p95 / median) * z / _Z95)


@register("hedging", "percentile", params=HedgeParams)
class HedgePolicy:
    """Hedge after the member's healthy latency quantile on the tier, within a token-bucket
    budget per member."""

    def __init__(self, params: HedgeParams) -> None:
        self.params = params

    def delay_s(self, replica: ReplicaView, peers: Sequence[ReplicaView] = ()) -> float | None:
        quantile = self.params.quantile
        known = [
            q for r in (replica, *peers) if (q := _latency_quantile_s(r, quantile)) is not None
        ]
        if not known:
            # Without data any delay is a guess; a guess too short doubles the load.
            return None
        observed = min(known)
        low = self.params.min_delay_ms / 1000.0
        high = self.params.max_delay_ms / 1000.0
        return min(max(observed, low), high)

    def initial_state(self) -> HedgeState:
        return HedgeState(tokens=self.params.burst)

    def on_primary(self, state: HedgeState) -> HedgeState:
        return HedgeState(tokens=min(state.tokens + self.params.budget, self.params.burst))

    def try_hedge(self, state: HedgeState) -> tuple[bool, HedgeState]:
        if state.tokens + _EPS < 1.0:
            return False, state
        return True, HedgeState(tokens=max(state.tokens - 1.0, 0.0))


@register("hedging", "none")
class NoHedge:
    """Never hedge."""

    def __init__(self, params: NoParams) -> None:
        del params

    def delay_s(self, replica: ReplicaView, peers: Sequence[ReplicaView] = ()) -> float | None:
        del replica, peers
        return None

    def initial_state(self) -> HedgeState:
        return HedgeState(tokens=0.0)

    def on_primary(self, state: HedgeState) -> HedgeState:
        return state

    def try_hedge(self, state: HedgeState) -> tuple[bool, HedgeState]:
        return False, state
