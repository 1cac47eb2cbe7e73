"""Live replica stats: outstanding calls, latency EWMA, recent p95."""

from __future__ import annotations

import pytest

from ensemble.replicas.stats import WINDOW, ReplicaStats


def test_outstanding_and_ewma() -> None:
    stats = ReplicaStats()
    stats.started()
    stats.started()
    assert stats.outstanding == 2
    stats.finished(0.010, ok=True)
    assert stats.outstanding == 1 and stats.ewma_s == pytest.approx(0.010)
    stats.finished(0.020, ok=True)
    assert stats.ewma_s == pytest.approx(0.013)  # 0.010 + 0.3 * (0.020 - 0.010)


def test_failures_do_not_lower_latency() -> None:
    stats = ReplicaStats()
    stats.started()
    stats.finished(0.5, ok=True)
    stats.started()
    stats.finished(0.0001, ok=False)
    assert stats.ewma_s == pytest.approx(0.5) and stats.failures == 1 and stats.outstanding == 0


def test_p95_over_a_bounded_recent_window() -> None:
    stats = ReplicaStats()
    for _ in range(7):
        stats.started()
        stats.finished(0.001, ok=True)
    assert stats.p95_s is None  # too few samples to call it a p95
    for i in range(100):
        stats.started()
        stats.finished(0.1 if i % 10 == 0 else 0.001, ok=True)  # 10% slow
    assert stats.p95_s == pytest.approx(0.1)
    for _ in range(WINDOW * 2):  # the old slow calls age out of the window
        stats.started()
        stats.finished(0.002, ok=True)
    assert stats.p95_s == pytest.approx(0.002)


def test_p95_of_the_last_calls_forgets_a_burst_before_the_window_does() -> None:
    stats = ReplicaStats()

    def record(latency_s: float, n: int) -> None:
        for _ in range(n):
            stats.started()
            stats.finished(latency_s, ok=True)

    record(0.001, 5)
    assert stats.p95_of_last(5) is None  # under 8 calls: no p95 yet
    record(0.5, 40)  # a burst's slow calls
    mark = stats.recorded
    record(0.002, 20)  # then fast again
    assert stats.recorded == mark + 20
    assert stats.p95_s == pytest.approx(0.5)  # the 128-call window still holds the burst
    assert stats.p95_of_last(stats.recorded - mark) == pytest.approx(0.002)
    assert stats.p95_of_last(2) == pytest.approx(0.002)  # at least the last 8
    assert stats.p95_of_last(30) == pytest.approx(0.5)  # 10 of the 30 were slow
    record(0.003, WINDOW + 3)  # wrapped around the ring: still the newest ones
    record(0.2, 1)
    assert stats.p95_of_last(8) == pytest.approx(0.2)
    assert stats.p95_of_last(10_000) == pytest.approx(0.003)  # at most the whole window


def test_an_abandoned_call_counts_as_slow_not_failed() -> None:
    stats = ReplicaStats()
    for _ in range(3):
        stats.started()
        stats.finished(0.010, ok=True)
    stats.started()
    stats.finished(0.100, ok=False, abandoned=True)  # a hedge's loser, cancelled at 100 ms
    assert stats.failures == 0 and stats.outstanding == 0
    assert stats.ewma_s is not None and stats.ewma_s > 0.010  # routing now sees it slower
    stats.started()
    stats.finished(0.001, ok=False, abandoned=True)  # cancelled early: says nothing
    assert stats.ewma_s > 0.010
