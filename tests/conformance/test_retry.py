"""Every registered retry policy: at least one attempt, retries within a finite budget counted in
virtual time, a refusal that spends nothing, and sane attempt timeouts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import registry
from policies.base import RetryBudgetState, RetryPolicy
from tests.conformance.registered import build, check_entry

RETRIES = registry.names("retry")


def test_builtins_registered() -> None:
    assert {"budget", "none"} <= set(RETRIES)


@pytest.mark.parametrize("name", RETRIES)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("retry", name)


@pytest.mark.parametrize("name", RETRIES)
def test_builds_with_defaults(name: str) -> None:
    policy = build("retry", name, RetryPolicy)
    assert policy.max_attempts >= 1
    assert isinstance(policy.initial_state(), RetryBudgetState)


@pytest.mark.parametrize("name", RETRIES)
@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.sampled_from(["request", "retry", "tick"]), max_size=300),
    remaining=st.none() | st.floats(min_value=-1.0, max_value=10.0),
    left=st.integers(min_value=1, max_value=10),
)
def test_retries_stay_within_their_budget(
    name: str, ops: list[str], remaining: float | None, left: int
) -> None:
    """However requests and retries interleave, retries granted within one window never
    exceed what a budget of ratio 1 plus its floor could give, and attempt timeouts are sane."""
    policy = build("retry", name, RetryPolicy)
    state, now, requests, granted = policy.initial_state(), 0.0, 0, 0
    for op in ops:
        if op == "request":
            state, requests = policy.on_request(state, now), requests + 1
        elif op == "retry":
            ok, after = policy.try_retry(state, now)
            if not ok:
                assert after == state, "a refused retry spends nothing"
            state, granted = after, granted + ok
        else:
            now += 0.001
    if policy.max_attempts == 1:
        assert granted == 0, "a policy of one attempt never retries"
    assert granted <= requests + 1_000
    timeout = policy.attempt_timeout_s(remaining, left)
    if remaining is None or left == 1:
        assert timeout is None, "no deadline or last attempt: the request's deadline rules"
    if timeout is not None:
        assert math.isfinite(timeout) and timeout >= 0.0
        assert remaining is not None and timeout <= max(remaining, 0.0) + 1e-9


@pytest.mark.parametrize("name", RETRIES)
def test_retries_without_requests_run_dry(name: str) -> None:
    """At one instant, with no first attempts to earn more, the budget grants a finite number."""
    policy = build("retry", name, RetryPolicy)
    state = policy.initial_state()
    for _ in range(100_000):
        ok, state = policy.try_retry(state, 5.0)
        if not ok:
            break
    else:
        pytest.fail("retries kept being granted with no requests")
    assert not policy.try_retry(state, 5.0)[0], "once dry, it stays dry at the same instant"


@pytest.mark.parametrize("name", RETRIES)
def test_same_calls_at_the_same_times_give_the_same_decisions(name: str) -> None:
    runs = []
    for policy in (build("retry", name, RetryPolicy), build("retry", name, RetryPolicy)):
        state, decisions = policy.initial_state(), []
        for i in range(200):
            now = i * 0.05
            state = policy.on_request(state, now)
            ok, state = policy.try_retry(state, now)
            decisions.append(ok)
        runs.append((decisions, state))
    assert runs[0] == runs[1]
