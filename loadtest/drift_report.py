"""The drift experiment's arithmetic and pages: each phase's accuracy, cost and uncertainty,
the drift score's crossing, goals, tables, report.md.

Pure functions of harness reports, /metrics deltas and readings; `loadtest/drift.py` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.experiment import (
    Goal,
    Report,
    goal_lines,
    goals_of,
    header_lines,
    markdown_table,
    num,
    pct,
    text_table,
)
from loadtest.measure import Sample, named, total

GOAL_POINTS = 2.0
GOAL_WINDOWS = 2
ESCALATE, PLAIN = "escalate", "plain"


@dataclass(frozen=True)
class Reading:
    """One read of the gateway's /metrics during a phase."""

    at: float
    score: float | None
    """The ensemble's input drift score then (None before its first full window)."""
    requests: float
    """Requests answered so far, every model and outcome."""


def phase_row(
    profile: str,
    phase: str,
    harness: Mapping[str, Any],
    change: Mapping[Sample, float],
    readings: Sequence[Reading],
    window: int,
) -> dict[str, Any]:
    """One profile's phase: the harness's view, the gateway's counts, the drift score (its
    highest and last once ``window`` requests into the phase, when every row the score saw
    is this phase's; the timeline from the start)."""
    sent = harness["requests"]["sent"]
    calls = total(change, "ensemble_member_calls_total")
    unsure = {
        labels["escalated"]: v for labels, v in named(change, "ensemble_uncertain_answers_total")
    }
    cost = total(change, "ensemble_cost_total")
    first = readings[0] if readings else Reading(0.0, None, 0.0)
    scores = [
        r.score for r in readings if r.score is not None and r.requests - first.requests >= window
    ]
    return {
        "profile": profile,
        "phase": phase,
        "sent": sent,
        "answered": harness["requests"]["answered"],
        "accuracy": harness["accuracy"],
        "latency_ms": harness["latency_ms"],
        "cost_per_1k": round(1000 * cost / sent, 6) if sent else None,
        "calls_per_request": round(calls / sent, 4) if sent else None,
        "uncertain": round(sum(unsure.values()) / sent, 4) if sent else None,
        "escalated": round(unsure.get("yes", 0.0) / sent, 4) if sent else None,
        "drift_max": round(max(scores), 4) if scores else None,
        "drift_last": round(scores[-1], 4) if scores else None,
        "score_timeline": [
            {
                "t": round(r.at - first.at, 2),
                "score": r.score,
                "requests": r.requests - first.requests,
            }
            for r in readings
        ],
    }


def crossing(row: Mapping[str, Any], threshold: float) -> float | None:
    """Requests into the phase until the drift score first read at or above ``threshold``;
    None when it never did."""
    for point in row["score_timeline"]:
        if point["score"] is not None and point["score"] >= threshold:
            return float(point["requests"])
    return None


def _row(rows: Sequence[Mapping[str, Any]], profile: str, phase: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["profile"] == profile and r["phase"] == phase), None)


def goals(rows: Sequence[Mapping[str, Any]], window: int, threshold: float) -> list[Goal]:
    """Detection on each profile's runs; escalation's accuracy against the plain profile's."""
    out = []
    for row in rows:
        if row["phase"] == "clean":
            worst = row["drift_max"]
            out.append(
                Goal(
                    f"no drift on clean data (score < {threshold:g})",
                    row["profile"],
                    f"highest score {num(worst, '.3f')}",
                    None if worst is None else worst < threshold,
                    {"drift_max": worst},
                )
            )
        else:
            after = crossing(row, threshold)
            limit = GOAL_WINDOWS * window
            out.append(
                Goal(
                    f"drift seen within {limit} requests (score >= {threshold:g})",
                    row["profile"],
                    f"crossed after {num(after, '.0f')} requests",
                    after is not None and after <= limit,
                    {"requests": after},
                )
            )
    escalated, plain = _row(rows, ESCALATE, "drifted"), _row(rows, PLAIN, "drifted")
    if escalated is not None and plain is not None:
        gain = None
        if escalated["accuracy"] is not None and plain["accuracy"] is not None:
            gain = 100 * (escalated["accuracy"] - plain["accuracy"])
        out.append(
            Goal(
                f"escalation keeps drifted accuracy >= {GOAL_POINTS:g} points above `{PLAIN}`",
                "",
                f"{num(gain, '+.2f')} points, cost per 1k {num(escalated['cost_per_1k'], '.5f')} "
                f"vs {num(plain['cost_per_1k'], '.5f')}",
                None if gain is None else gain >= GOAL_POINTS,
                {"points": gain},
            )
        )
    return out


def _table(report: Report) -> tuple[list[str], list[list[str]]]:
    threshold = report["drift"]["threshold"]
    header = [
        "profile",
        "phase",
        "accuracy",
        "uncertain",
        "escalated",
        "calls/req",
        "cost/1k",
        "p50 ms",
        "p99 ms",
        "drift (max)",
        "seen after",
    ]
    body = [
        [
            r["profile"],
            r["phase"],
            num(r["accuracy"], ".4f"),
            pct(r["uncertain"], ".1f"),
            pct(r["escalated"], ".1f"),
            num(r["calls_per_request"], ".2f"),
            num(r["cost_per_1k"], ".5f"),
            num(r["latency_ms"]["p50"], ".2f"),
            num(r["latency_ms"]["p99"], ".2f"),
            num(r["drift_max"], ".3f"),
            "-" if r["phase"] == "clean" else num(crossing(r, threshold), ".0f", " req"),
        ]
        for r in report["runs"]
    ]
    return header, body


def summary(report: Report) -> str:
    return f"{text_table(*_table(report))}\n\n{goal_lines(goals_of(report))}"


def render_markdown(report: Report) -> str:
    s, d = report["settings"], report["drift"]
    lines = [
        "# Data that drifts: detection, uncertainty and escalation",
        "",
        *header_lines(report),
        f"- config: `{s['config']}` (drift window {d['window']} rows, threshold "
        f"{d['threshold']:g}); gateway exit code {report['gateway_exit_code']}",
        f"- load: open-loop Poisson, {s['rps']:g} req/s, HTTP binary tensors, one generator "
        f"process; per profile {s['clean_s']:g} s on the test split, then {s['drifted_s']:g} s "
        f"on it with {100 * s['dropout']:g}% of every row's pixels zeroed",
        "- seen after: requests into the drifted phase until `ensemble_input_drift` (read every "
        "0.25 s) reached the threshold",
        "",
        markdown_table(*_table(report)),
        "",
        "## Goals",
        "",
        "```",
        goal_lines(goals_of(report)),
        "```",
    ]
    return "\n".join(lines)
