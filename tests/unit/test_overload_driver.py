"""loadtest/overload.py's bookkeeping: one report becomes a row, the median run is chosen, and a
run that could not start is left out (the runs themselves are load tests, not unit tests)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.overload import median_row, row


def report(goodput: float, shed: int = 0, sent: int = 1000, steal: float | None = 0.1) -> Any:
    return {
        "requests": {"sent": sent},
        "errors": {"http_429": shed, "http_504": 3, "timeout": 0},
        "generator": {"send_lag_ms": {"p99": 2.5}, "generator_saturated": False},
        "throughput_rps": goodput * 1.03,
        "goodput_rps": goodput,
        "latency_ms": {"p50": 10.0, "p99": 80.0},
        "steal_cores": steal,
    }


def test_a_report_becomes_a_row_with_shed_share_and_host_steal() -> None:
    r = row(report(700.0, shed=400), 1600.0)
    assert r is not None
    assert r["shed_pct"] == pytest.approx(40.0)
    assert r["errors"] == {"http_429": 400, "http_504": 3}  # zero counts dropped
    assert r["steal_cores"] == 0.1 and r["offered_rps"] == 1600.0
    assert row(None, 1600.0) is None


def test_the_median_run_is_the_lower_middle_and_failed_runs_are_left_out() -> None:
    rows = [row(report(g), 1600.0) for g in (900.0, 500.0, 700.0, 600.0)] + [None]
    assert median_row(rows)["goodput_rps"] == 600.0
    with pytest.raises(RuntimeError, match="could start"):
        median_row([None, None])
