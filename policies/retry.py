"""Retry policies: whether a failed call may go to another replica, and each attempt's time."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from policies.base import RetryBudgetState
from policies.registry import NoParams, register

__all__ = ["NoRetry", "RetryBudget", "RetryBudgetParams", "deadline_share"]

# The allowance is a floating-point product (0.29 * 100 is 28.999999999999996); without a
# tolerance the 29th retry that budget allows would be refused.
_EPS = 1e-9


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
