"""Hedging budget, retry budget, circuit breaker and deadline helpers, in virtual time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ensemble.types import ReplicaView
from policies import registry
from policies.base import BreakerState, HedgingPolicy
from policies.hedging import HedgeParams, HedgePolicy, NoHedge
from policies.outlier_detection import CircuitBreaker, CircuitBreakerParams
from policies.retry import RetryBudget, RetryBudgetParams, deadline_share


def replica(p95: float | None = None, ewma: float | None = None) -> ReplicaView:
    return ReplicaView("r", "edge", True, latency_ewma_s=ewma, latency_p95_s=p95)


# --- hedging -------------------------------------------------------------------------------


def test_hedge_delay_is_the_p95_clamped() -> None:
    policy = HedgePolicy(HedgeParams(min_delay_ms=5, max_delay_ms=200))
    assert policy.delay_s(replica()) is None
    assert policy.delay_s(replica(p95=0.050)) == pytest.approx(0.050)
    assert policy.delay_s(replica(p95=0.001)) == pytest.approx(0.005)
    assert policy.delay_s(replica(p95=3.0)) == pytest.approx(0.200)


def test_hedge_delay_other_quantiles_from_lognormal_fit() -> None:
    r = replica(p95=0.040, ewma=0.010)
    median = HedgePolicy(HedgeParams(quantile=0.5, min_delay_ms=0)).delay_s(r)
    p99 = HedgePolicy(HedgeParams(quantile=0.99)).delay_s(r)
    p90 = HedgePolicy(HedgeParams(quantile=0.9)).delay_s(r)
    assert median == pytest.approx(0.010)
    assert p90 is not None and p99 is not None
    assert 0.010 < p90 < 0.040 < p99
    # Without a spread (no EWMA) the observed p95 is the answer for any quantile.
    assert HedgePolicy(HedgeParams(quantile=0.99)).delay_s(replica(p95=0.04)) == 0.04


def test_hedge_budget_bucket_starts_full_and_refills_per_primary() -> None:
    policy = HedgePolicy(HedgeParams(budget=0.1, burst=2))
    state = policy.initial_state()
    ok1, state = policy.try_hedge(state)
    ok2, state = policy.try_hedge(state)
    ok3, state = policy.try_hedge(state)
    assert (ok1, ok2, ok3) == (True, True, False)
    for _ in range(9):
        state = policy.on_primary(state)
    assert policy.try_hedge(state)[0] is False
    state = policy.on_primary(state)
    ok, state = policy.try_hedge(state)
    assert ok
    for _ in range(1000):
        state = policy.on_primary(state)
    assert state.tokens == pytest.approx(2.0), "capped at the burst"


def test_default_budget_earns_a_hedge_every_twenty_primaries() -> None:
    policy = HedgePolicy(HedgeParams(burst=1))
    state = policy.initial_state()
    _, state = policy.try_hedge(state)
    for _ in range(20):
        state = policy.on_primary(state)
    assert policy.try_hedge(state)[0], "float sums of 0.05 must still reach one token"


def test_no_hedge_never_hedges() -> None:
    policy = NoHedge(registry.NoParams())
    state = policy.initial_state()
    for _ in range(100):
        state = policy.on_primary(state)
    assert policy.try_hedge(state) == (False, state)
    assert policy.delay_s(replica(p95=0.01, ewma=0.005)) is None


def test_hedge_params_validated() -> None:
    entry = registry.lookup("hedging", "percentile")
    assert isinstance(entry.build({"quantile": 0.99, "budget": 0.02}), HedgingPolicy)
    for bad in ({"quantile": 1.0}, {"budget": -0.1}, {"min_delay_ms": 9, "max_delay_ms": 1}):
        with pytest.raises(ValidationError):
            entry.build(bad)
    with pytest.raises(ValidationError, match="extra"):
        entry.build({"quantil": 0.9})
    for field in HedgeParams.model_fields.values():
        assert field.description


@settings(max_examples=300, deadline=None)
@given(
    budget=st.floats(min_value=0.0, max_value=1.0),
    burst=st.floats(min_value=1.0, max_value=20.0),
    ops=st.lists(st.booleans(), max_size=400),
)
def test_hedges_never_exceed_budget(budget: float, burst: float, ops: list[bool]) -> None:
    policy = HedgePolicy(HedgeParams(budget=budget, burst=burst))
    state = policy.initial_state()
    primaries = hedges = 0
    for is_primary in ops:
        if is_primary:
            primaries += 1
            state = policy.on_primary(state)
        else:
            ok, state = policy.try_hedge(state)
            hedges += ok
        assert hedges <= budget * primaries + burst + 1e-6
        assert 0.0 <= state.tokens <= burst


# --- retry budget --------------------------------------------------------------------------


def test_retry_budget_minimum_without_traffic() -> None:
    budget = RetryBudget(RetryBudgetParams(ratio=0.2, min_retries_per_s=0.5, window_s=4))
    state = budget.initial_state()
    now = 100.0
    granted = 0
    for _ in range(10):
        ok, state = budget.try_retry(state, now)
        granted += ok
    assert granted == 2, "0.5 per second over a 4 s window"
    # Once the window has slid past those retries the minimum is available again.
    ok, state = budget.try_retry(state, now + 4.0)
    assert ok


def test_retry_budget_ratio_of_requests() -> None:
    budget = RetryBudget(RetryBudgetParams(ratio=0.1, min_retries_per_s=0.0, window_s=10))
    state = budget.initial_state()
    now = 0.0
    for _ in range(50):
        state = budget.on_request(state, now)
        now += 0.01
    results = []
    for _ in range(8):
        ok, state = budget.try_retry(state, now)
        results.append(ok)
    assert results == [True] * 5 + [False] * 3
    assert budget.window_counts(state, now) == (50, 5)
    # The requests expire with the window, and the retries they paid for with them.
    assert budget.window_counts(state, now + 10.0) == (0, 0)
    assert budget.try_retry(state, now + 10.0)[0] is False


def test_retry_budget_ignores_a_stale_clock() -> None:
    budget = RetryBudget(RetryBudgetParams(min_retries_per_s=0.1, window_s=10))
    state = budget.initial_state()
    ok, state = budget.try_retry(state, 50.0)
    assert ok
    assert budget.try_retry(state, 10.0)[0] is False, "an earlier `now` reopens nothing"


Event = tuple[str, float]


@settings(max_examples=300, deadline=None)
@given(
    ratio=st.floats(min_value=0.0, max_value=1.0),
    min_per_s=st.sampled_from([0.0, 0.1, 1.0, 3.0]),
    events=st.lists(
        st.tuples(st.sampled_from(["request", "retry"]), st.floats(0.0, 3.0)), max_size=200
    ),
)
def test_retry_budget_bound(ratio: float, min_per_s: float, events: list[Event]) -> None:
    """At every granted retry: retries <= ratio * requests + floor over the window, recounted."""
    params = RetryBudgetParams(ratio=ratio, min_retries_per_s=min_per_s, window_s=5, buckets=5)
    budget = RetryBudget(params)
    state = budget.initial_state()
    now = 0.0
    log: list[tuple[str, int]] = []
    for kind, dt in events:
        now += dt
        bucket = math.floor(now)  # window_s / buckets = 1 s
        if kind == "request":
            state = budget.on_request(state, now)
            log.append(("request", bucket))
            continue
        ok, state = budget.try_retry(state, now)
        if not ok:
            continue
        log.append(("retry", bucket))
        window = [k for k, b in log if b > bucket - params.buckets]
        retries, requests = window.count("retry"), window.count("request")
        assert retries <= ratio * requests + min_per_s * params.window_s + 1e-6


def test_retry_budget_params_validated() -> None:
    with pytest.raises(ValidationError):
        RetryBudgetParams(ratio=1.5)
    with pytest.raises(ValidationError):
        RetryBudgetParams.model_validate({"window_s": 10, "ttl_s": 3})


# --- circuit breaker -----------------------------------------------------------------------

PARAMS = CircuitBreakerParams(
    consecutive_failures=3, base_ejection_s=10, max_ejection_s=25, probe_timeout_s=5
)


def fail_n(cb: CircuitBreaker, state: BreakerState, n: int, now: float) -> BreakerState:
    for _ in range(n):
        state = cb.on_failure(state, now)
    return state


def test_breaker_ejects_after_consecutive_failures_only() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 2, 0.0)
    state = cb.on_success(state, 0.0)
    state = fail_n(cb, state, 2, 0.0)
    assert not cb.is_ejected(state, 0.0), "a success in between resets the count"
    state = cb.on_failure(state, 1.0)
    assert cb.is_ejected(state, 1.0)
    assert cb.allow(state, 10.9) == (False, state)


def test_breaker_half_open_probe_closes_on_success() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 3, 0.0)
    assert cb.phase(state, 10.0) == "half_open"
    assert not cb.is_ejected(state, 10.0), "routable so the probe can go"
    ok, state = cb.allow(state, 10.0)
    assert ok and cb.phase(state, 10.0) == "probing" and cb.is_ejected(state, 10.0)
    assert cb.allow(state, 11.0)[0] is False, "one probe at a time"
    state = cb.on_success(state, 11.0)
    assert cb.phase(state, 11.0) == "closed"
    assert cb.allow(state, 11.0)[0] and cb.allow(state, 11.0)[0]


def test_breaker_failed_probe_ejects_longer_up_to_the_cap() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 3, 0.0)
    assert state.ejected_until == 10.0
    _, state = cb.allow(state, 10.0)
    state = cb.on_failure(state, 10.5)
    assert state.ejected_until == pytest.approx(30.5), "second ejection: 2 x base"
    _, state = cb.allow(state, 31.0)
    state = cb.on_failure(state, 31.0)
    assert state.ejected_until == pytest.approx(56.0), "third: 3 x base capped at 25"


def test_breaker_lost_probe_counts_as_failure() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 3, 0.0)
    _, state = cb.allow(state, 10.0)
    assert cb.allow(state, 14.9)[0] is False
    ok, state = cb.allow(state, 15.0)
    assert not ok and cb.phase(state, 15.0) == "open"
    assert state.times_ejected == 2


def test_breaker_ignores_late_results_while_open() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 3, 0.0)
    assert cb.on_success(state, 5.0) == state
    assert cb.on_failure(state, 5.0) == state


def test_breaker_forgets_ejections_after_staying_healthy() -> None:
    cb = CircuitBreaker(PARAMS)
    state = fail_n(cb, cb.initial_state(), 3, 0.0)
    _, state = cb.allow(state, 10.0)
    state = cb.on_success(state, 10.0)
    soon = fail_n(cb, state, 3, 20.0)
    assert soon.ejected_until == pytest.approx(40.0), "flapping: 2 x base"
    later = fail_n(cb, state, 3, 35.0)
    assert later.ejected_until == pytest.approx(45.0), "healthy for max_ejection_s: base again"


def test_breaker_params_validated() -> None:
    with pytest.raises(ValidationError):
        CircuitBreakerParams(base_ejection_s=60, max_ejection_s=30)
    with pytest.raises(ValidationError):
        CircuitBreakerParams(consecutive_failures=0)
    with pytest.raises(ValidationError):
        CircuitBreakerParams.model_validate({"interval_s": 1})


@settings(max_examples=300, deadline=None)
@given(
    # Weighted towards failures and whole-second steps so most runs reach half-open repeatedly.
    ops=st.lists(
        st.tuples(
            st.sampled_from(["allow"] * 3 + ["failure"] * 4 + ["success"]),
            st.integers(0, 6).map(float),
        ),
        min_size=40,
        max_size=300,
    )
)
def test_breaker_at_most_one_probe_per_half_open_period(ops: list[tuple[str, float]]) -> None:
    cb = CircuitBreaker(PARAMS)
    state = cb.initial_state()
    now = 0.0
    probed_periods: set[float] = set()
    until: float | None = None
    for op, dt in ops:
        now += dt
        if op == "success":
            state = cb.on_success(state, now)
        elif op == "failure":
            state = cb.on_failure(state, now)
        else:
            phase = cb.phase(state, now)
            period = state.ejected_until
            ok, state = cb.allow(state, now)
            if period is not None and now < period:
                assert not ok, "allowed while ejected"
            if phase == "closed":
                assert ok
            elif phase in ("open", "probing"):
                assert not ok
            else:
                assert ok and period is not None
                assert period not in probed_periods, "second probe in one half-open period"
                probed_periods.add(period)
        if state.ejected_until is not None and state.ejected_until != until:
            assert 0.0 < state.ejected_until - now <= PARAMS.max_ejection_s
        until = state.ejected_until
        assert cb.is_ejected(state, now) == (cb.phase(state, now) in ("open", "probing"))


# --- deadlines -----------------------------------------------------------------------------


def test_deadline_share_splits_remaining_time() -> None:
    assert deadline_share(0.3, 3, 0.01) == pytest.approx(0.1)
    assert deadline_share(0.3, 1, 0.01) == pytest.approx(0.3)


def test_deadline_share_gives_the_minimum_when_it_still_fits() -> None:
    assert deadline_share(0.05, 4, 0.02) == pytest.approx(0.02)


def test_deadline_share_none_when_minimum_does_not_fit() -> None:
    assert deadline_share(0.01, 1, 0.02) is None
    assert deadline_share(0.0, 2, 0.0) is None
    assert deadline_share(-1.0, 2, 0.0) is None


def test_deadline_share_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stages_left"):
        deadline_share(1.0, 0, 0.01)
    with pytest.raises(ValueError, match="min_call_s"):
        deadline_share(1.0, 1, -0.01)


@given(
    remaining=st.floats(-1.0, 10.0),
    stages=st.integers(1, 10),
    minimum=st.floats(0.0, 1.0),
)
def test_deadline_share_fits_the_remaining_time(
    remaining: float, stages: int, minimum: float
) -> None:
    share = deadline_share(remaining, stages, minimum)
    if share is None:
        assert remaining <= 0.0 or remaining < minimum
    else:
        assert minimum <= share <= remaining
