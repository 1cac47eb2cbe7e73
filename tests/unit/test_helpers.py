"""The shared test helpers: ``metric`` reads the series it is asked for and no other; ``wait_for``
gives up within its time and its count of checks."""

from __future__ import annotations

import pytest

from tests.helpers import metric, wait_for

SCRAPE = """\
# HELP ensemble_retries_total Retries.
# TYPE ensemble_retries_total counter
ensemble_retries_total{member="forest",tier="edge"} 2.0
ensemble_retries_total{member="forest",tier="cloud"} 3.0
ensemble_retries_total{member="forests",tier="edge"} 100.0
ensemble_retries_created{member="forest",tier="edge"} 1.7e9
ensemble_admission_limit 4.5
ensemble_admission_limit_max 64.0
"""


def test_metric_sums_the_series_it_names_and_no_other() -> None:
    assert metric(SCRAPE, 'ensemble_retries_total{member="forest",tier="edge"}') == 2.0
    assert metric(SCRAPE, 'ensemble_retries_total{member="forest"') == 5.0  # every tier
    assert metric(SCRAPE, "ensemble_retries_total") == 105.0
    assert metric(SCRAPE, "ensemble_admission_limit") == 4.5  # not ..._max


def test_a_missing_series_fails_unless_there_is_a_default() -> None:
    with pytest.raises(AssertionError, match="no ensemble_shed_requests_total in the metrics"):
        metric(SCRAPE, "ensemble_shed_requests_total")
    assert metric(SCRAPE, "ensemble_shed_requests_total", 0.0) == 0.0
    assert metric(SCRAPE, "ensemble_shed_requests_total", None) is None


def test_wait_for_returns_once_the_check_passes() -> None:
    answers = iter([False, False, True])
    assert wait_for(lambda: next(answers), "the third check", 5.0, interval_s=0.001) < 5.0


def test_wait_for_gives_up_within_its_count_of_checks() -> None:
    checks: list[int] = []
    with pytest.raises(AssertionError, match="waiting for: never\nthe log"):
        wait_for(
            lambda: checks.append(1),
            "never",
            0.02,
            interval_s=0.005,
            detail=lambda: "the log",
        )
    assert 1 <= len(checks) <= 5  # 0.02 s / 0.005 s, and the first check
