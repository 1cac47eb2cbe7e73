"""Reliability mechanisms as pure state machines: hedging, retries, outlier ejection, deadlines."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ensemble.types import ReplicaView
from policies.registry import NoParams, register

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitBreakerParams",
    "HedgeParams",
    "HedgePolicy",
    "HedgeState",
    "HedgingPolicy",
    "NoEjection",
    "NoHedge",
    "NoRetry",
    "OutlierDetector",
    "RetryBudget",
    "RetryBudgetParams",
    "RetryBudgetState",
    "RetryPolicy",
    "deadline_share",
]

# Budgets add up fractional tokens (0.05 twenty times is not exactly 1.0 in floating point);
# without a tolerance the twentieth primary would not quite earn its hedge.
_EPS = 1e-9


# --- hedging -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HedgeState:
    """The hedge budget's token bucket; one token pays for one hedge."""

    tokens: float


@runtime_checkable
class HedgingPolicy(Protocol):
    """When to send a second copy of a call, and whether the budget still allows one."""

    def delay_s(self, replica: ReplicaView) -> float | None:
        """How long the first call may run before a hedge goes out; None: never hedge it."""
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


class HedgeParams(BaseModel):
    """Params of the ``percentile`` hedging policy (The Tail at Scale's hedged requests)."""

    model_config = ConfigDict(extra="forbid")

    quantile: float = Field(
        default=0.95,
        ge=0.5,
        lt=1.0,
        description=(
            "Hedge once the first call has run longer than this latency quantile of its "
            "replica. 0.95 uses the observed p95; others are estimated (log-normal fit "
            "through the latency EWMA and the p95)."
        ),
    )
    budget: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Most hedges per first call, over time (0.05: at most 5% extra calls).",
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
    """Hedge after the replica's latency quantile, within a token-bucket budget."""

    def __init__(self, params: HedgeParams) -> None:
        self.params = params

    def delay_s(self, replica: ReplicaView) -> float | None:
        observed = _latency_quantile_s(replica, self.params.quantile)
        if observed is None:
            # Without data any delay is a guess; a guess too short doubles the load.
            return None
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

    def delay_s(self, replica: ReplicaView) -> float | None:
        del replica
        return None

    def initial_state(self) -> HedgeState:
        return HedgeState(tokens=0.0)

    def on_primary(self, state: HedgeState) -> HedgeState:
        return state

    def try_hedge(self, state: HedgeState) -> tuple[bool, HedgeState]:
        return False, state


# --- retry budget --------------------------------------------------------------------------


class RetryBudgetParams(BaseModel):
    """Params of the ``budget`` retry policy (Finagle's RetryBudget, Envoy's retry_budget)."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Attempts per member call, the first included; each retry goes to a replica "
        "not yet tried (another replica or tier, in the routing policy's order).",
    )
    min_attempt_ms: float = Field(
        default=2.0,
        ge=0.0,
        description="With a request deadline, each attempt gets an even share of the time left "
        "(so a hung replica leaves time to try another), but never less than this.",
    )
    ratio: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="Retries allowed per request over the window (0.2: 20% extra calls).",
    )
    min_retries_per_s: float = Field(
        default=3.0,
        ge=0.0,
        description="Retries always allowed at low traffic, where the ratio alone gives none.",
    )
    window_s: float = Field(
        default=10.0, gt=0.0, description="Length of the sliding window requests count over."
    )
    buckets: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="The window slides in this many steps; more is smoother and costs more state.",
    )


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


@dataclass(frozen=True, slots=True)
class RetryBudgetState:
    """Counts per window bucket, oldest first: (bucket index, requests, retries)."""

    buckets: tuple[tuple[int, int, int], ...] = ()


@register("retry", "budget", params=RetryBudgetParams)
class RetryBudget:
    """Retry on another replica while retries <= ratio * requests + min_retries_per_s * window_s."""

    def __init__(self, params: RetryBudgetParams | None = None) -> None:
        self.params = params or RetryBudgetParams()
        self._bucket_s = self.params.window_s / self.params.buckets

    @property
    def max_attempts(self) -> int:
        return self.params.max_attempts

    def attempt_timeout_s(self, remaining_s: float | None, attempts_left: int) -> float | None:
        if remaining_s is None or attempts_left <= 1:
            return None
        share = deadline_share(remaining_s, attempts_left, self.params.min_attempt_ms / 1000.0)
        return share if share is not None else max(remaining_s, 0.0)

    def initial_state(self) -> RetryBudgetState:
        return RetryBudgetState()

    def _slide(self, state: RetryBudgetState, now: float) -> tuple[int, list[list[int]]]:
        index = math.floor(now / self._bucket_s)
        if state.buckets:
            # A clock is monotonic, but a caller's stale `now` must not reopen a closed bucket.
            index = max(index, state.buckets[-1][0])
        oldest = index - self.params.buckets + 1
        kept = [list(b) for b in state.buckets if b[0] >= oldest]
        if not kept or kept[-1][0] != index:
            kept.append([index, 0, 0])
        return index, kept

    def window_counts(self, state: RetryBudgetState, now: float) -> tuple[int, int]:
        """(requests, retries) inside the window ending at ``now``."""
        _, kept = self._slide(state, now)
        return sum(b[1] for b in kept), sum(b[2] for b in kept)

    def on_request(self, state: RetryBudgetState, now: float) -> RetryBudgetState:
        """A first attempt went out (retries are not requests: they must not earn retries)."""
        _, kept = self._slide(state, now)
        kept[-1][1] += 1
        return RetryBudgetState(tuple((b[0], b[1], b[2]) for b in kept))

    def try_retry(self, state: RetryBudgetState, now: float) -> tuple[bool, RetryBudgetState]:
        """Whether a retry may go out now; counts it when it may."""
        _, kept = self._slide(state, now)
        requests = sum(b[1] for b in kept)
        retries = sum(b[2] for b in kept)
        floor = self.params.min_retries_per_s * self.params.window_s
        allowance = self.params.ratio * requests + floor
        if retries + 1 > allowance + _EPS:
            return False, state
        kept[-1][2] += 1
        return True, RetryBudgetState(tuple((b[0], b[1], b[2]) for b in kept))


@register("retry", "none")
class NoRetry:
    """Never retry: a failed call is the member's failure (hedging may still fail over)."""

    def __init__(self, params: NoParams) -> None:
        del params

    @property
    def max_attempts(self) -> int:
        return 1

    def initial_state(self) -> RetryBudgetState:
        return RetryBudgetState()

    def on_request(self, state: RetryBudgetState, now: float) -> RetryBudgetState:
        del now
        return state

    def try_retry(self, state: RetryBudgetState, now: float) -> tuple[bool, RetryBudgetState]:
        del now
        return False, state

    def attempt_timeout_s(self, remaining_s: float | None, attempts_left: int) -> float | None:
        del remaining_s, attempts_left
        return None


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreakerParams(BaseModel):
    """Params of per-replica outlier ejection (Envoy's consecutive-5xx outlier detection)."""

    model_config = ConfigDict(extra="forbid")

    consecutive_failures: int = Field(
        default=5, ge=1, description="Consecutive failed calls that eject a replica."
    )
    base_ejection_s: float = Field(
        default=30.0,
        gt=0.0,
        description="First ejection's length; the n-th ejection in a row lasts n times this.",
    )
    max_ejection_s: float = Field(
        default=300.0,
        gt=0.0,
        description=(
            "Cap on one ejection's length; a replica healthy for this long after its last "
            "ejection starts again from base_ejection_s."
        ),
    )
    probe_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="A half-open probe with no outcome after this long counts as failed.",
    )

    @model_validator(mode="after")
    def _ejection_ordered(self) -> Self:
        if self.base_ejection_s > self.max_ejection_s:
            raise ValueError("base_ejection_s must not exceed max_ejection_s")
        return self


Phase = Literal["closed", "open", "half_open", "probing"]


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


@register("outlier_detection", "consecutive_failures", params=CircuitBreakerParams)
class CircuitBreaker:
    """Outlier ejection per replica: eject, wait, one half-open probe, close or eject longer."""

    def __init__(self, params: CircuitBreakerParams | None = None) -> None:
        self.params = params or CircuitBreakerParams()

    def initial_state(self) -> BreakerState:
        return BreakerState()

    def phase(self, state: BreakerState, now: float) -> Phase:
        """closed: calls flow; open: none; half_open: one probe may go; probing: it is out."""
        if state.ejected_until is None:
            return "closed"
        if now < state.ejected_until:
            return "open"
        return "half_open" if state.probe_sent_at is None else "probing"

    def is_ejected(self, state: BreakerState, now: float) -> bool:
        """Whether routing must skip the replica (it stays routable while a probe may go, and
        once a probe has gone unanswered for probe_timeout_s, so that ``allow`` settles it)."""
        phase = self.phase(state, now)
        if phase == "probing":
            assert state.probe_sent_at is not None
            return now - state.probe_sent_at < self.params.probe_timeout_s
        return phase == "open"

    def allow(self, state: BreakerState, now: float) -> tuple[bool, BreakerState]:
        """Whether a call may go to the replica now; granting the half-open probe is recorded."""
        phase = self.phase(state, now)
        if phase == "closed":
            return True, state
        if phase == "half_open":
            return True, replace(state, probe_sent_at=now)
        if phase == "probing":
            assert state.probe_sent_at is not None
            # A probe whose outcome never arrives would otherwise hold the breaker half-open
            # forever; treating it as failed keeps "one probe per period" and moves on.
            if now - state.probe_sent_at >= self.params.probe_timeout_s:
                return False, self._eject(state, now)
        return False, state

    def on_success(self, state: BreakerState, now: float) -> BreakerState:
        """A call to the replica succeeded."""
        phase = self.phase(state, now)
        if phase == "closed":
            return replace(state, failures=0) if state.failures else state
        if phase == "open":
            # A call sent before the ejection answering late says little about the replica now.
            return state
        return BreakerState(times_ejected=state.times_ejected, closed_at=now)

    def on_failure(self, state: BreakerState, now: float) -> BreakerState:
        """A call to the replica failed (timeouts included)."""
        phase = self.phase(state, now)
        if phase == "open":
            return state
        if phase == "closed":
            failures = state.failures + 1
            if failures < self.params.consecutive_failures:
                return replace(state, failures=failures)
        return self._eject(state, now)

    def _eject(self, state: BreakerState, now: float) -> BreakerState:
        times = state.times_ejected
        if state.closed_at is not None and now - state.closed_at >= self.params.max_ejection_s:
            times = 0
        times += 1
        length = min(self.params.base_ejection_s * times, self.params.max_ejection_s)
        return BreakerState(times_ejected=times, ejected_until=now + length)


@register("outlier_detection", "none")
class NoEjection:
    """Never eject a replica."""

    def __init__(self, params: NoParams) -> None:
        del params

    def initial_state(self) -> BreakerState:
        return BreakerState()

    def is_ejected(self, state: BreakerState, now: float) -> bool:
        del state, now
        return False

    def allow(self, state: BreakerState, now: float) -> tuple[bool, BreakerState]:
        del now
        return True, state

    def on_success(self, state: BreakerState, now: float) -> BreakerState:
        del now
        return state

    def on_failure(self, state: BreakerState, now: float) -> BreakerState:
        del now
        return state


# --- deadlines -----------------------------------------------------------------------------


def deadline_share(remaining_s: float, stages_left: int, min_call_s: float) -> float | None:
    """Time budget of the next call when ``stages_left`` calls (this one included) share the rest.

    ROHE's deadline scheduling: an even share of the remaining time. When the share is below
    ``min_call_s`` but the remaining time still fits it, the call gets the minimum (later stages
    are often skipped, as in cascades, so the certain call comes first); None when even the
    minimum does not fit, so the caller drops the call instead of starting a sure miss.
    """
    if stages_left < 1:
        raise ValueError(f"stages_left must be at least 1; got {stages_left}")
    if min_call_s < 0.0:
        raise ValueError(f"min_call_s must not be negative; got {min_call_s}")
    if remaining_s <= 0.0 or remaining_s < min_call_s:
        return None
    return max(remaining_s / stages_left, min_call_s)
