"""The deadline experiment's arithmetic on synthetic records and /metrics readings: deadlines
met per third, the last miss after a change, cloud calls per third, the time to adapt."""

from __future__ import annotations

import pytest

from loadtest.deadline_report import Reading, adaptation, goals, link_row
from loadtest.runner import GeneratorResult, Records

NEAR, FAR = 0.005, 0.075  # one-way delays, seconds


def readings() -> list[Reading]:
    """Every 0.25 s for 9 s: the link goes near at 0.1 s, far at 3.1 s, near again at 6.1 s;
    the cloud answers 10 calls a reading while near, one last call 0.25 s into far, and none
    again until 0.75 s into near again."""
    out, calls = [], 0.0
    for k in range(37):
        at = k * 0.25
        delay = 0.020 if at < 0.1 else NEAR if at < 3.1 else FAR if at < 6.1 else NEAR
        if delay == NEAR and not 6.1 <= at < 6.85:
            calls += 10
        elif delay == FAR and at < 3.3:
            calls += 1
        out.append(Reading(100.0 + at, delay, calls))
    return out


def test_adaptation_times_each_change_from_the_last_reading_before_it() -> None:
    assert adaptation(readings()) == [
        {"to_round_trip_ms": 150.0, "cloud": "stopped", "after_s": 0.25},
        {"to_round_trip_ms": 10.0, "cloud": "resumed", "after_s": 1.0},
    ]


def test_the_link_put_back_as_the_run_ends_is_no_phase() -> None:
    ended = [*readings(), Reading(109.25, 0.020, readings()[-1].cloud_calls)]  # run over
    assert len(adaptation(ended)) == 2
    assert (
        link_row(records(), 60.0, (3.0, 6.0), ended)["phases"][2]["cloud_calls_per_request"] == 0.9
    )


def test_calls_that_never_stop_are_no_adaptation() -> None:
    steady = [Reading(float(k), NEAR if k < 4 else FAR, 10.0 * k) for k in range(8)]
    steady.insert(0, Reading(-1.0, 0.02, 0.0))
    assert adaptation(steady) == [{"to_round_trip_ms": 150.0, "cloud": "stopped", "after_s": None}]


def records() -> GeneratorResult:
    """300 requests over 9 s, 20 ms each, one sample each, all right; three late ones just
    after the link went far, one wrong answer near again."""
    rec = Records()
    for i in range(300):
        t = i * 0.03
        late = 3.0 <= t < 3.08
        rec.add(t, 0.0, 0.09 if late else 0.02, 0, 0, 0 if i == 250 else 1)
    return GeneratorResult(rec, {}, 0, 0.1, 9.0)


def test_a_link_row_splits_the_run_in_thirds() -> None:
    row = link_row(records(), 60.0, (3.0, 6.0), readings())
    near, far, again = row["phases"]
    assert [p["sent"] for p in row["phases"]] == [100, 100, 100]
    assert (near["met"], far["met"], again["met"]) == (1.0, 0.97, 1.0)
    assert far["last_miss_s"] == pytest.approx(0.06) and again["last_miss_s"] == 0.0
    assert again["accuracy"] == pytest.approx(0.99)
    assert row["met"] == pytest.approx(0.99)
    assert [p["cloud_calls_per_request"] for p in row["phases"]] == [1.11, 0.0, 0.9]
    assert row["timeline"][0] == {"t": 0.25, "round_trip_ms": 10.0, "cloud_calls_per_s": 40.0}


def test_the_link_goal_needs_the_cloud_left_and_taken_back() -> None:
    row = link_row(records(), 60.0, (3.0, 6.0), readings())
    link = {"profiles": {"live": row}}
    tight = [
        {"profile": "live", "slo_attainment": 1.0, "accuracy": 0.96},
        {"profile": "edge_only", "slo_attainment": 1.0, "accuracy": 0.96},
    ]
    tight_goal, link_goal = goals(tight, link)
    assert tight_goal.passed is True
    assert link_goal.passed is True and link_goal.values["adapt_s"] == [0.25, 1.0]
    row["phases"][1]["cloud_calls_per_request"] = 0.9  # kept calling the far cloud
    assert goals(tight, link)[1].passed is False
