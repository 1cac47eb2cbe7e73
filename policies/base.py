"""One small Protocol per policy kind, with the state and context types it takes.

Kinds (``policies.registry.Kind``): selection, aggregation, routing, hedging, retry,
outlier_detection, admission, autoscaling. Policies decide; the runtime in ``ensemble`` does I/O.

Stateful policies never keep state on ``self``: the caller holds it and passes it back
(``decide(ctx, state) -> (decision, state)``), so a policy is a pure function of its inputs,
testable in virtual time, and a hot reload can drop or carry state explicitly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ensemble.types import (
    Aggregate,
    AggregationContext,
    Feedback,
    MemberAnswer,
    Pick,
    ReplicaView,
    RoutingContext,
    SelectionContext,
    SplitContext,
)


@runtime_checkable
class SelectionPolicy(Protocol):
    """Chooses which ensemble members answer one request, possibly in stages.

    The runtime calls ``select`` with no answers first, asks the members it names, then calls
    again with every answer so far; an empty tuple ends the request (cascades escalate by
    naming more members; one-shot policies return ``()`` on the second call). A member named
    as a ``Pick(member, tier)`` is asked on that tier first (its placements in
    ``MemberView.placements`` say what each tier takes and costs now); a plain name leaves the
    tier to routing.
    """

    def initial_state(self) -> Any:
        """State before any request (e.g. bandit weights); ``None`` for stateless policies."""
        ...

    def select(
        self, ctx: SelectionContext, answers: Sequence[MemberAnswer], state: Any
    ) -> tuple[tuple[str | Pick, ...], Any]:
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


# --- hedging -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HedgeState:
    """A hedge budget's token bucket (one per member of a profile); one token pays for one
    hedge."""

    tokens: float


@runtime_checkable
class HedgingPolicy(Protocol):
    """When to send a second copy of a call, and whether the budget still allows one."""

    def delay_s(self, replica: ReplicaView, peers: Sequence[ReplicaView] = ()) -> float | None:
        """How long a first call to ``replica`` may run before a hedge goes out; None: never
        hedge it. ``peers``: the member's other replicas on the same tier that routing may use
        now, so the delay can come from the member's healthy latency rather than from a slow
        replica's own (a straggler's p95 is its delay)."""
        ...

    def initial_state(self) -> HedgeState:
        """The budget before any call."""
        ...

    def on_primary(self, state: HedgeState) -> HedgeState:
        """A first (non-hedge) call went out: the budget earns its share."""
        ...

    def try_hedge(self, state: HedgeState) -> tuple[bool, HedgeState]:
        """Whether a hedge may go out now; spends from the budget when it may."""
        ...


# --- retry ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryBudgetState:
    """Counts per window bucket, oldest first: (bucket index, requests, retries)."""

    buckets: tuple[tuple[int, int, int], ...] = ()


@runtime_checkable
class RetryPolicy(Protocol):
    """Whether a failed call may be retried on another replica, and how long each attempt may
    take."""

    @property
    def max_attempts(self) -> int:
        """Attempts per member call, the first included (1: never retry)."""
        ...

    def initial_state(self) -> RetryBudgetState: ...

    def on_request(self, state: RetryBudgetState, now: float) -> RetryBudgetState:
        """A first attempt went out."""
        ...

    def try_retry(self, state: RetryBudgetState, now: float) -> tuple[bool, RetryBudgetState]:
        """Whether a retry may go out now; counts it when it may."""
        ...

    def attempt_timeout_s(self, remaining_s: float | None, attempts_left: int) -> float | None:
        """How long the next attempt may run (None: until the request's deadline)."""
        ...


# --- outlier detection ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One replica's breaker: closed unless ``ejected_until`` is set."""

    failures: int = 0
    """Consecutive failures while closed."""
    times_ejected: int = 0
    """Ejections since the replica last stayed healthy for max_ejection_s."""
    ejected_until: float | None = None
    probe_sent_at: float | None = None
    """When the one half-open probe was allowed; None while no probe is out."""
    closed_at: float | None = None
    """When the last ejection ended with a successful probe."""


@runtime_checkable
class OutlierDetector(Protocol):
    """Per-replica ejection from call outcomes; one ``BreakerState`` per replica."""

    def initial_state(self) -> BreakerState: ...

    def is_ejected(self, state: BreakerState, now: float) -> bool:
        """Whether routing must skip the replica now."""
        ...

    def allow(self, state: BreakerState, now: float) -> tuple[bool, BreakerState]:
        """Whether a call may go now; records a half-open probe."""
        ...

    def on_success(self, state: BreakerState, now: float) -> BreakerState: ...

    def on_failure(self, state: BreakerState, now: float) -> BreakerState: ...


# --- admission -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateView:
    """The gate when a request arrives: requests running, and the priorities waiting, oldest
    first; ``limit`` is an adaptive policy's current limit (its ``LimitState.limit``), which the
    gate keeps for it, else None."""

    running: int
    waiting: Sequence[int]
    limit: float | None = None


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


@dataclass(frozen=True, slots=True)
class LimitState:
    """An adaptive limit between updates: the limit, the long-window baseline and the
    short-window recent service time (seconds; 0 before the first window), and when it was
    last updated (the gate's clock, seconds)."""

    limit: float
    baseline_s: float = 0.0
    recent_s: float = 0.0
    updated_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LatencyWindow:
    """What the gate saw since the last update: the service times (seconds, slot taken to slot
    given back) of the requests that finished, the most requests running at once, and now."""

    service_s: Sequence[float]
    peak_running: int
    now_s: float


@runtime_checkable
class AdaptiveLimit(Protocol):
    """An admission policy whose limit the gate updates from measured service times."""

    window_requests: int
    """Update after this many finished requests ..."""
    window_s: float
    """... or when this long has passed since the last update and at least one finished."""

    def start(self, previous: LimitState | None, now_s: float) -> LimitState:
        """The state to begin with (``previous``: the last policy's, kept across reloads)."""
        ...

    def update(self, state: LimitState, window: LatencyWindow) -> LimitState:
        """The state after one window of finished requests."""
        ...


# --- autoscaling ---------------------------------------------------------------------------


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
    """p95 latency of its replicas' calls over the window (the slowest replica's; the last 8
    calls when fewer; None when none finished in it)."""
    ready_replicas: int | None = None
    """Replicas that take calls now (failed, unhealthy or still starting ones do not); None:
    the same as ``replicas``."""
    failures_rps: float = 0.0
    """Failed calls per second over the window."""
    service_ms: float | None = None
    """How long one call holds an idle replica (the fastest tenth of recent calls, which met
    no queue, less the network's round trip ``link_ms``; at least the member card's batch-1
    p50): INFaaS's per-replica throughput is 1000 / service_ms."""
    link_ms: float = 0.0
    """The network's share of a call's latency (an emulated link's two legs): a call spends it
    on the wire, not holding a replica, so it is no part of a replica's throughput."""
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
    """What an autoscaling decision sees: now, every placement's load, and the tier caps."""

    now_s: float
    placements: tuple[PlacementLoad, ...]
    tier_max_replicas: Mapping[str, int] = field(default_factory=dict)
    """Tiers with a cap on replicas across all their members (`tiers.NAME.max_replicas`)."""
    window_s: float = 0.0
    """What rates and calls in flight are averaged over (`autoscaling.window_s`): decisions
    closer together than it see overlapping windows (0: unknown)."""


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """Target replicas per (member, tier) and why; a placement left out keeps its count."""

    targets: Mapping[tuple[str, str], int] = field(default_factory=dict)
    reasons: Mapping[tuple[str, str], str] = field(default_factory=dict)


@runtime_checkable
class AutoscalingPolicy(Protocol):
    """Replicas per placement from one window of load; the caller keeps the state."""

    def initial_state(self) -> Any:
        """State before the first decision; ``None`` for stateless policies."""
        ...

    def decide(self, ctx: ScalingContext, state: Any) -> tuple[ScalingDecision, Any]:
        """Targets within each placement's bounds (and its tier's cap), and the new state."""
        ...


# --- split computing -------------------------------------------------------------------------


@runtime_checkable
class SplitPolicy(Protocol):
    """Where a split member runs one call: all on the head tier, all on the tail tier, or cut
    at a tensor (Neurosurgeon's choice, made per call on the link as it is now)."""

    def choose(self, ctx: SplitContext) -> str:
        """The name of one of ``ctx.options`` (a ready one when any is)."""
        ...
