"""The `r3e` autoscaling policy: edge first, burst to the cloud, predictive, N+1, replacing failed
replicas, cloud scale-to-zero, an hourly cost budget (the gateway's default scaling objective).

Pure like every autoscaling policy (``policies/autoscaling.py``): ``decide(context, state) ->
(decision, state)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.autoscaling import (
    EPS,
    Key,
    Wish,
    cap_tiers,
    changed_targets,
    clamp_to_bounds,
    hold_wish,
    replica_throughput_rps,
)
from policies.base import PlacementLoad, ScalingContext, ScalingDecision
from policies.registry import register

__all__ = ["R3e", "R3eParams", "R3eState"]


class R3eParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier_order: list[str] = Field(
        default_factory=lambda: ["edge", "cloud"],
        max_length=32,
        description="Tiers filled first, in this order; tiers not listed come after, the "
        "cheaper per replica-hour first. A member's first tier is its primary, the rest burst.",
    )
    warm_tiers: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Tiers whose placements are kept at their max replicas whatever the load "
        "(within tier caps): capacity that costs nothing more to hold, such as owned edge "
        "devices, is headroom a sudden step lands on while a paid tier scales. Empty: every "
        "tier follows its need.",
    )
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        le=10_000,
        description="Calls in flight each replica should carry (Ray Serve's signal); used "
        "only while no service time is known (otherwise `drain_s` reads calls in flight).",
    )
    drain_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Calls queued beyond what the rate keeps busy (Little's law: calls in "
        "flight - rate x service time) should be served within this long: the demand grows by "
        "queued / drain_s. Catches a step before the windowed rate shows it, without asking a "
        "replica per queued call.",
    )
    headroom: float = Field(
        1.2, ge=1.0, le=10.0, description="Plan for this multiple of the (predicted) rate."
    )
    p95_slo_ms: float = Field(
        100.0,
        gt=0,
        le=600_000,
        description="p95 latency a placement should meet; a full one that misses it bursts "
        "one more replica onto the next tier.",
    )
    spare: int = Field(
        1,
        ge=0,
        le=64,
        description="Replicas beyond the need (N+1), on the primary tier when its bounds "
        "allow, else on the next tier.",
    )
    lookahead_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Plan for the rate this far ahead on its linear trend (rising only); "
        "about the time a new replica takes to serve.",
    )
    trend_window_s: float = Field(
        30.0, gt=0, le=86_400, description="Rate history the trend is fitted over."
    )
    trend_min_t: float = Field(
        3.0,
        ge=0,
        le=100,
        description="A rising trend counts only when its slope is at least this many standard "
        "errors above zero (a flat but noisy rate has no trend); 0: any rising slope.",
    )
    upscale_delay_s: float = Field(
        1.0, ge=0, le=3600, description="How long more replicas must be wanted before adding."
    )
    downscale_delay_s: float = Field(
        30.0, ge=0, le=86_400, description="How long fewer must be wanted before removing."
    )
    max_downscale_step: int = Field(
        1, ge=1, le=256, description="Most replicas one decision removes from a placement."
    )
    scale_to_zero_after_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="A burst placement (not the member's first tier, min 0) gives up its "
        "last replica after this long without burst need.",
    )
    startup_grace_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Replicas this policy added that are not ready yet count as starting, "
        "not failed, for this long.",
    )
    max_cost_per_hour: float | None = Field(
        None,
        ge=0,
        le=1e9,
        description="Budget for the sum of replicas x tier price per hour over all "
        "placements (null: unlimited); over it, the most expensive burst replicas go first.",
    )

    @field_validator("tier_order", "warm_tiers")
    @classmethod
    def _distinct(cls, tiers: list[str]) -> list[str]:
        if len(set(tiers)) != len(tiers):
            raise ValueError("names a tier twice")
        return tiers


@dataclass(frozen=True, slots=True)
class R3eState:
    """What r3e carries from one decision to the next."""

    rates: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """Per member: (time, arrival rate) over the trend window."""
    wishes: Mapping[Key, Wish] = field(default_factory=dict)
    needed_s: Mapping[Key, float] = field(default_factory=dict)
    """Per burst placement: when it last had burst need."""
    started: Mapping[Key, tuple[float, int]] = field(default_factory=dict)
    """Per placement: when this policy last added replicas, and how many."""


@dataclass(frozen=True, slots=True)
class _Demand:
    rps: float
    """Calls per second the member should be able to serve."""
    speeds: Mapping[str, float]
    """Per tier: calls per second one replica serves."""
    why: str


def _slope(
    points: tuple[tuple[float, float], ...], min_t: float = 0.0, window_s: float = 0.0
) -> float:
    """Least-squares slope of rate over time (req/s per s); 0 with under two points, and 0
    unless it is at least ``min_t`` standard errors (from the fit's residuals) above zero.

    Rates averaged over ``window_s`` and sampled more often than that share their calls: m
    samples per window carry about one sample's news, so the standard error grows by sqrt(m)
    (otherwise the noise of a flat rate passes for a trend)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread <= 0:
        return 0.0
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / spread
    if min_t <= 0 or slope <= 0:
        return slope
    if n < 3:
        return 0.0  # two points: no residuals, no idea of the noise
    residual = sum((r - mean_r - slope * (t - mean_t)) ** 2 for t, r in points)
    error = math.sqrt(residual / (n - 2) / spread)
    spacing = (points[-1][0] - points[0][0]) / (n - 1)
    overlap = max(1.0, window_s / spacing) if spacing > 0 else 1.0
    return slope if slope >= min_t * error * math.sqrt(overlap) else 0.0


@register("autoscaling", "r3e", params=R3eParams)
class R3e:
    """Edge first, burst to the cloud, N+1, replace failures, scale bursts to zero, within budget.

    Per member, every decision:

    1. **Demand** (elasticity). The member's arrival rate over all its tiers, extrapolated
       ``lookahead_s`` ahead on its linear trend (a least-squares fit over ``trend_window_s``
       of history kept in the state; rising trends only, so it scales before the load arrives
       but never shrinks on a forecast, and only a slope ``trend_min_t`` standard errors
       above zero, so the noise of a flat rate is no trend), times ``headroom``. A
       replica serves INFaaS's T = 1000 / service_ms calls per second (p95 when the idle
       latency is unknown). The queue counts too (it shows a step before a windowed rate
       does): by Little's law a placement keeps rate / T calls busy, the rest of its calls
       in flight are queued, and serving them within ``drain_s`` needs rate + queued /
       ``drain_s``; the larger of the two is the demand. Unlike Ray Serve's calls in flight
       / ``target_ongoing_requests`` it does not ask a replica per queued call; without any
       latency known it falls back to that rule.
    2. **Placement**. Tiers are taken in ``tier_order`` (unlisted ones after, cheaper first).
       The demand fills the member's first tier up to its ``max_replicas`` and what the tier
       cap (``tiers.NAME.max_replicas``, shared by all members) leaves it, members sharing it
       trimmed largest first; the rest bursts onto the next tier, and so on. A placement that
       is full and misses ``p95_slo_ms`` also bursts: its next tier gets one replica more than
       its need (not than it has: a p95 lags behind a scale-up and must not ratchet).
       Placements on ``warm_tiers`` keep their ``max_replicas`` whatever the need: capacity
       that costs nothing more to hold takes a step while a paid tier scales.
    3. **Reliability**. ``spare`` replicas beyond the need (N+1) follow it: on the primary tier
       when its bounds allow, else on the next tier.
    4. **Resilience**. Replicas that do not take calls (failed, ejected, still loading) are no
       capacity: the target grows by them so that the need is met by ready ones (bounded by
       ``max_replicas``). Replicas this policy added within ``startup_grace_s`` count as
       starting, not failed, so it does not double a scale-up while they load.
    5. **Hysteresis**. Up after more has been wanted for ``upscale_delay_s``, straight to the
       need; down after less has been wanted for ``downscale_delay_s``, then at most
       ``max_downscale_step`` per decision. A burst placement (not the member's first tier,
       ``min_replicas`` 0) keeps its last replica until it has had no burst need for
       ``scale_to_zero_after_s``.
    6. **Cost**. With ``max_cost_per_hour``, while the sum of replicas x tier price is over it,
       the most expensive burst replica goes first, then the most expensive primary one, never
       below a placement's minimum. Tier caps are enforced last, on the final counts.

    Every target's reason says which of these moved it, e.g. ``37.0 req/s x1.2 needs 5 at
    9.5 req/s per replica; edge full (4/4) -> burst 1 to cloud; +1 spare on cloud``."""

    def __init__(self, params: R3eParams) -> None:
        self.params = params

    def initial_state(self) -> R3eState:
        return R3eState()

    def decide(self, ctx: ScalingContext, state: R3eState) -> tuple[ScalingDecision, R3eState]:
        p, now = self.params, ctx.now_s
        loads = {load.key: load for load in ctx.placements}
        rank = self._tier_rank(ctx.placements)
        members: dict[str, list[PlacementLoad]] = {}
        for load in sorted(ctx.placements, key=lambda x: (rank[x.tier], x.member)):
            members.setdefault(load.member, []).append(load)
        first = {m: placed[0].tier for m, placed in members.items()}
        burst = {k for k, x in loads.items() if x.tier != first[x.member] and x.min_replicas == 0}
        rates: dict[str, tuple[tuple[float, float], ...]] = {}
        demands: dict[str, _Demand] = {}
        for m, placed in members.items():
            rate = sum(x.arrival_rps for x in placed)
            rates[m] = (*self._history(state.rates.get(m, ()), now, None), (now, rate))
            demands[m] = self._demand(placed, rates[m], rate, ctx.window_s)
        starting = {k: n for k, (t, n) in state.started.items() if now - t < p.startup_grace_s}
        ideal, needed, notes = self._place(ctx, members, demands, starting, rank)

        final = {k: x.replicas for k, x in loads.items()}
        said: dict[Key, list[str]] = {k: [] for k in loads}
        wishes: dict[Key, Wish] = {}
        needed_s = {
            k: now if needed[k] else state.needed_s.get(k, now) for k in loads if k in burst
        }
        for key, load in loads.items():
            want, have = ideal[key], load.replicas
            if want == have:
                continue
            wish = hold_wish(state.wishes.get(key), 1 if want > have else -1, now)
            wishes[key] = wish
            waited = now - wish.since_s
            if want > have:
                if waited >= p.upscale_delay_s:
                    final[key] = want
                continue
            step = max(want, have - p.max_downscale_step)
            if step == 0 and key in burst:  # the last burst replica has its own cooldown
                idle = now - needed_s[key]
                if idle >= p.scale_to_zero_after_s:
                    final[key] = 0
                    said[key].append(f"no burst need for {idle:.0f} s -> scale to zero")
                elif have > 1 and waited >= p.downscale_delay_s:
                    final[key] = 1
                    said[key].append(
                        f"down to 1; zero after {p.scale_to_zero_after_s:g} s without burst need"
                    )
            elif waited >= p.downscale_delay_s:
                final[key] = step
                said[key].append(f"less wanted for {waited:.0f} s: down {have - step}")
        self._within_budget(final, loads, first, said)
        for key, note in cap_tiers(ctx, final).items():
            said[key].append(f"trimmed to the {note}")
        started = {
            k: (now, final[k] - loads[k].replicas) for k in loads if final[k] > loads[k].replicas
        }
        started.update({k: state.started[k] for k in starting if k not in started})
        reasons = {k: "; ".join([demands[k[0]].why, *notes[k[0]], *said[k]]) for k in loads}
        return changed_targets(ctx, final, reasons), R3eState(rates, wishes, needed_s, started)

    def _tier_rank(
        self, placements: tuple[PlacementLoad, ...]
    ) -> dict[str, tuple[int, float, str]]:
        """Sort key per tier: listed tiers in ``tier_order``, then the cheaper, then by name."""
        listed = {t: i for i, t in enumerate(self.params.tier_order)}
        prices: dict[str, float] = {}
        for load in placements:
            prices[load.tier] = min(prices.get(load.tier, math.inf), load.cost_per_replica_hour)
        return {
            t: (listed[t], 0.0, t) if t in listed else (len(listed), price, t)
            for t, price in prices.items()
        }

    def _history(
        self, past: tuple[tuple[float, float], ...], now: float, rate: float | None
    ) -> tuple[tuple[float, float], ...]:
        kept = tuple(pt for pt in past if 0 < now - pt[0] < self.params.trend_window_s)
        return kept if rate is None else (*kept, (now, rate))

    def _demand(
        self,
        placed: list[PlacementLoad],
        history: tuple[tuple[float, float], ...],
        rate: float,
        window_s: float,
    ) -> _Demand:
        """The rate one member must be able to serve, and each tier's rate per replica."""
        p = self.params
        measured = {x.tier: replica_throughput_rps(x) for x in placed}
        known = [s for s in measured.values() if s is not None]
        # A tier without latency yet is assumed as fast as one with; with none known a
        # replica is one unit and only calls in flight size the member.
        speeds = {
            t: s if s is not None else (known[0] if known else 1.0) for t, s in measured.items()
        }
        speed = speeds[placed[0].tier]
        inflight = sum(x.outstanding for x in placed)
        if not known:  # no service time: Ray Serve's rule, calls in flight per replica
            n = math.ceil(inflight / p.target_ongoing_requests - EPS)
            why = (
                f"{inflight:.1f} calls in flight / {p.target_ongoing_requests:g} per replica "
                f"needs {n}"
            )
            return _Demand(inflight / p.target_ongoing_requests * speed, speeds, why)
        slope = _slope(history, p.trend_min_t, window_s)
        ahead = rate + max(0.0, slope) * p.lookahead_s
        by_rate = ahead * p.headroom
        # Little's law: the rate keeps rate x (service time + time on the wire) calls in
        # flight; the rest wait. A windowed rate lags a step, the queue does not.
        queued = sum(
            max(0.0, x.outstanding - x.arrival_rps * (1 / speeds[x.tier] + x.link_ms / 1e3))
            for x in placed
        )
        by_queue = rate + queued / p.drain_s
        rps = max(by_rate, by_queue)
        n = math.ceil(rps / speed - EPS)
        if by_rate >= by_queue:
            trend = (
                f" trending +{slope:.2f} req/s per s -> {ahead:.1f} in {p.lookahead_s:g} s"
                if ahead > rate + EPS
                else ""
            )
            why = (
                f"{rate:.1f} req/s{trend} x{p.headroom:g} needs {n} at {speed:.1f} req/s "
                "per replica"
            )
        else:
            why = (
                f"{rate:.1f} req/s + {queued:.1f} queued / {p.drain_s:g} s needs {n} at "
                f"{speed:.1f} req/s per replica"
            )
        return _Demand(rps, speeds, why)

    def _place(
        self,
        ctx: ScalingContext,
        members: dict[str, list[PlacementLoad]],
        demands: dict[str, _Demand],
        starting: Mapping[Key, int],
        rank: Mapping[str, tuple[int, float, str]],
    ) -> tuple[dict[Key, int], dict[Key, bool], dict[str, list[str]]]:
        """Each placement's ideal count (within its bounds and the tier caps), whether it has
        any need at all, and the notes per member saying why."""
        p = self.params
        residual = {m: d.rps for m, d in demands.items()}
        spare_left = dict.fromkeys(members, p.spare)
        full: dict[str, str] = {}  # member -> its last tier was full: say where the rest went
        missed: dict[str, str] = {}  # member -> its last tier missed the SLO at its max
        ideal: dict[Key, int] = {}
        needed: dict[Key, bool] = {}
        notes: dict[str, list[str]] = {m: [] for m in members}
        for tier in sorted(rank, key=rank.__getitem__):
            here = [x for placed in members.values() for x in placed if x.tier == tier]
            failed: dict[Key, int] = {}
            for_need: dict[Key, int] = {}
            for load in here:
                key, m = load.key, load.member
                failed[key] = max(0, load.replicas - load.ready - starting.get(key, 0))
                for_need[key] = math.ceil(residual[m] / demands[m].speeds[tier] - EPS)
                want = for_need[key] + spare_left[m]
                want += failed[key] if want else 0  # replace failures only where needed
                if m in missed:  # one more than the need, not than it has: a p95 that lags
                    want += 1  # behind a scale-up must not add a replica every decision
                if tier in p.warm_tiers:
                    want = max(want, load.max_replicas)
                ideal[key] = clamp_to_bounds(want, load)
                needed[key] = want > 0
            cap = ctx.tier_max_replicas.get(tier)
            free = math.inf
            if cap is not None:
                total = sum(ideal[x.key] for x in here)
                while total > cap:
                    over = [x.key for x in here if ideal[x.key] > x.min_replicas]
                    if not over:
                        break
                    ideal[max(over, key=lambda k: (ideal[k], k))] -= 1
                    total -= 1
                free = max(0, cap - total)
            for load in here:
                key, m, speed = load.key, load.member, demands[load.member].speeds[tier]
                room = int(min(load.max_replicas, ideal[key] + free))
                usable = max(0, ideal[key] - failed[key])
                covered = min(usable, for_need[key])
                residual[m] = max(0.0, residual[m] - covered * speed)
                spare = min(spare_left[m], usable - covered)
                spare_left[m] -= spare
                if m in full:
                    notes[m].append(f"{full.pop(m)} -> burst {covered} to {tier}")
                if m in missed:
                    notes[m].append(f"{missed.pop(m)} -> +1 on {tier}")
                if spare:
                    notes[m].append(f"+{spare} spare on {tier}")
                if failed[key]:
                    notes[m].append(f"{failed[key]} not ready on {tier}: replaced")
                if covered < for_need[key]:
                    full[m] = f"{tier} full ({ideal[key]}/{room})"
                if load.replicas >= room and (load.p95_ms or 0.0) > p.p95_slo_ms:
                    missed[m] = (
                        f"{tier} p95 {load.p95_ms:.0f} ms > SLO {p.p95_slo_ms:g} ms at its max "
                        f"({load.replicas}/{room})"
                    )
        for m, note in full.items():
            short = math.ceil(residual[m] / demands[m].speeds[members[m][-1].tier] - EPS)
            notes[m].append(f"{note}, no tier left: short {short}")
        for m, note in missed.items():
            notes[m].append(f"{note}, no tier to burst to")
        return ideal, needed, notes

    def _within_budget(
        self,
        final: dict[Key, int],
        loads: Mapping[Key, PlacementLoad],
        first: Mapping[str, str],
        said: dict[Key, list[str]],
    ) -> None:
        """Trim ``final`` in place to the hourly budget: burst replicas first, dearest first."""
        budget = self.params.max_cost_per_hour
        if budget is None:
            return
        cost = sum(n * loads[k].cost_per_replica_hour for k, n in final.items())
        before, trimmed = cost, dict.fromkeys(final, 0)
        while cost > budget + EPS:
            over = [
                k
                for k, n in final.items()
                if n > loads[k].min_replicas and loads[k].cost_per_replica_hour > 0
            ]
            if not over:
                break
            key = max(
                over,
                key=lambda k: (k[1] != first[k[0]], loads[k].cost_per_replica_hour, final[k], k),
            )
            final[key] -= 1
            trimmed[key] += 1
            cost -= loads[key].cost_per_replica_hour
        for key, n in trimmed.items():
            if n:
                kind = "burst" if key[1] != first[key[0]] else "primary"
                said[key].append(
                    f"cost {before:.2f}/h over budget {budget:g}/h: -{n} {kind} on {key[1]} "
                    f"(now {cost:.2f}/h)"
                )
