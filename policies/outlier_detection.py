"""Outlier-detection policies: per-replica ejection from call outcomes (circuit breakers)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.base import BreakerState
from policies.registry import NoParams, register

__all__ = ["CircuitBreaker", "CircuitBreakerParams", "NoEjection"]


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
