"""The drift experiment's arithmetic on synthetic harness reports, /metrics deltas and
readings: rates per request, the drift score's crossing, the goals."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.drift_report import Reading, crossing, goals, phase_row


def harness(accuracy: float) -> dict[str, Any]:
    return {
        "requests": {"sent": 400, "answered": 400},
        "accuracy": accuracy,
        "latency_ms": {"p50": 1.0, "p99": 5.0},
    }


def change(calls: float, unsure_yes: float, unsure_no: float) -> dict[Any, float]:
    return {
        ("ensemble_member_calls_total", (("member", "logreg"),)): calls,
        ("ensemble_cost_total", (("model", "digits"),)): calls * 1e-5,
        (
            "ensemble_uncertain_answers_total",
            (("ensemble", "digits"), ("escalated", "yes")),
        ): unsure_yes,
        (
            "ensemble_uncertain_answers_total",
            (("ensemble", "digits"), ("escalated", "no")),
        ): unsure_no,
    }


def readings(scores: list[float | None]) -> list[Reading]:
    """One reading every 0.25 s, 25 requests apart."""
    return [Reading(10.0 + i * 0.25, s, 1000.0 + 25 * i) for i, s in enumerate(scores)]


def test_a_phase_row_counts_per_request_and_times_the_crossing() -> None:
    row = phase_row(
        "escalate",
        "drifted",
        harness(0.88),
        change(1000, 100, 0),
        readings([0.25, None, 0.09, 0.14]),
        window=50,
    )
    assert row["calls_per_request"] == 2.5 and row["cost_per_1k"] == pytest.approx(0.025)
    assert row["uncertain"] == 0.25 and row["escalated"] == 0.25
    assert row["drift_max"] == 0.14 and row["drift_last"] == 0.14  # 0.25: the last phase's rows
    assert row["score_timeline"][3] == {"t": 0.75, "score": 0.14, "requests": 75.0}
    assert crossing(row, 0.1) == 0.0 and crossing(row, 0.2) == 0.0 and crossing(row, 0.5) is None


def test_goals_judge_detection_and_escalation() -> None:
    rows = [
        phase_row("plain", "clean", harness(0.97), change(400, 0, 10), readings([0.04, 0.05]), 1),
        phase_row("plain", "drifted", harness(0.80), change(400, 0, 90), readings([0.05, 0.13]), 1),
        phase_row("escalate", "clean", harness(0.97), change(420, 10, 0), readings([0.06]), 1),
        phase_row("escalate", "drifted", harness(0.85), change(760, 90, 0), readings([0.2]), 1),
    ]
    verdicts = {
        (g.name.split(" (")[0].split(" within")[0], g.subject): g.passed
        for g in goals(rows, 200, 0.1)
    }
    assert verdicts[("no drift on clean data", "plain")] is True
    assert (
        verdicts[("drift seen", "plain")] is True and verdicts[("drift seen", "escalate")] is True
    )
    [gain] = [g for g in goals(rows, 200, 0.1) if g.name.startswith("escalation")]
    assert gain.passed is True and gain.values["points"] == pytest.approx(5.0)
    late = phase_row("plain", "drifted", harness(0.8), change(400, 0, 0), readings([0.05] * 30), 1)
    [seen] = [g for g in goals([late], 200, 0.1)]
    assert seen.passed is False and seen.values["requests"] is None
