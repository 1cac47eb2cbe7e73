"""The deadline experiment's arithmetic and pages: deadlines met per profile and third of the
link run, the time to adapt, goals, tables, report.md.

Pure functions of the harness's records and report rows; `loadtest/deadline.py` runs it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

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

if TYPE_CHECKING:
    from loadtest.runner import GeneratorResult

LIVE, BASELINE = "live", "edge_only"
GOAL_MET = 0.99
GOAL_ADAPT_S = 2.0
PHASES = ("near", "far", "near again")


@dataclass(frozen=True)
class Reading:
    """One read of the gateway's /metrics during a link run."""

    at: float
    """time.monotonic() when read."""
    delay_s: float
    """The cloud link's one-way delay then."""
    cloud_calls: float
    """Calls to cloud replicas so far."""


def link_row(
    result: GeneratorResult,
    deadline_ms: float,
    changes: tuple[float, float],
    readings: Sequence[Reading],
) -> dict[str, Any]:
    """One profile's link run: deadlines met and accuracy over the whole run and per third
    (split at ``changes``, seconds after the start, by intended send time) with the last miss
    after each change; and from the /metrics ``readings``, cloud calls per request per third,
    the time to adapt to each change and a timeline."""
    from loadtest.runner import OK

    rec = result.records
    intended = np.frombuffer(rec.intended, dtype=np.float64)
    latency = np.frombuffer(rec.latency, dtype=np.float64)
    correct = np.frombuffer(rec.correct, dtype=np.int16)
    ok = np.frombuffer(rec.kind, dtype=np.int8) == rec.kinds.index(OK)
    met = ok & (latency * 1000 <= deadline_ms)
    bounds = (0.0, *changes, float("inf"))
    everyone = np.ones(intended.shape, dtype=bool)
    phases: list[dict[str, Any]] = []
    for j, phase in enumerate(PHASES):
        here = (intended >= bounds[j]) & (intended < bounds[j + 1])
        missed = intended[here & ~met]
        last_miss = None if j == 0 else (float(missed.max()) - bounds[j] if missed.size else 0.0)
        phases.append({"phase": phase, **_stats(here, met, correct), "last_miss_s": last_miss})
    for row, calls in zip(phases, _cloud_calls_per_phase(readings), strict=False):
        row["cloud_calls_per_request"] = round(calls / row["sent"], 4) if row["sent"] else None
    return {
        **_stats(everyone, met, correct),
        "phases": phases,
        "adapt_s": adaptation(readings),
        "timeline": _timeline(readings),
    }


def _stats(here: np.ndarray, met: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    sent = int(here.sum())
    checked = here & (correct >= 0)
    samples = int(checked.sum())
    return {
        "sent": sent,
        "met": round(float((here & met).sum()) / sent, 6) if sent else None,
        "accuracy": round(float(correct[checked].sum()) / samples, 6) if samples else None,
    }


def _changes(readings: Sequence[Reading]) -> list[int]:
    """Indexes of the readings that first show a new link delay."""
    return [i for i in range(1, len(readings)) if readings[i].delay_s != readings[i - 1].delay_s]


def _cloud_calls_per_phase(readings: Sequence[Reading]) -> list[float]:
    """Calls to the cloud between the link's changes (the first change sets the near delay at
    the start of the run, so phases begin there)."""
    marks = _changes(readings)[: len(PHASES)]
    if len(readings) < 2 or not marks:
        return []
    edges = [*marks, len(readings) - 1]
    return [readings[b].cloud_calls - readings[a].cloud_calls for a, b in itertools.pairwise(edges)]


def adaptation(readings: Sequence[Reading]) -> list[dict[str, Any]]:
    """Per change of the link after the first: how long until the calls to the cloud stopped
    (the delay went up) or came back (it went down), measured from the last reading before
    the change to the first reading after the last (or first) new call; None when that did not
    happen before the next change (or the end of the run)."""
    # The first change sets the near link as the run starts; the phases' own changes follow;
    # one more may show as the run ends (the harness putting the config's link back).
    marks = _changes(readings)[: len(PHASES)]
    out = []
    for n, i in enumerate(marks[1:], start=1):
        before = readings[i - 1]
        end = marks[n + 1] if n + 1 < len(marks) else len(readings)
        went_far = readings[i].delay_s > before.delay_s
        moved = [k for k in range(i, end) if readings[k].cloud_calls > readings[k - 1].cloud_calls]
        at: float | None
        if went_far:  # None when the calls never stopped before the next change
            at = None if moved and moved[-1] == end - 1 else readings[moved[-1] if moved else i].at
        else:
            at = readings[moved[0]].at if moved else None
        out.append(
            {
                "to_round_trip_ms": round(2000 * readings[i].delay_s, 3),
                "cloud": "stopped" if went_far else "resumed",
                "after_s": None if at is None else round(at - before.at, 3),
            }
        )
    return out


def _timeline(readings: Sequence[Reading]) -> list[dict[str, Any]]:
    if not readings:
        return []
    t0 = readings[0].at
    return [
        {
            "t": round(b.at - t0, 3),
            "round_trip_ms": round(2000 * b.delay_s, 3),
            "cloud_calls_per_s": round((b.cloud_calls - a.cloud_calls) / (b.at - a.at), 2),
        }
        for a, b in itertools.pairwise(readings)
        if b.at > a.at
    ]


def goals(tight: Sequence[dict[str, Any]], link: dict[str, Any]) -> list[Goal]:
    """1: live meets the tight deadline with edge_only's accuracy; 2: live meets the deadline
    over the whole link run, accuracy recovering when the link does."""
    out = []
    rows = {r["profile"]: r for r in tight}
    live, base = rows.get(LIVE), rows.get(BASELINE)
    if live is not None:
        met, acc = live["slo_attainment"], live["accuracy"]
        floor = None if base is None else base["accuracy"]
        passed = None if met is None or acc is None else met >= GOAL_MET
        if passed and floor is not None:
            passed = acc >= floor
        out.append(
            Goal(
                f"tight deadline (live: >= {100 * GOAL_MET:g}% met, accuracy >= {BASELINE}'s)",
                "",
                f"{pct(met)} met, accuracy {num(acc, '.4f')} vs {num(floor, '.4f')}",
                passed,
                {"met": met, "accuracy": acc, "baseline_accuracy": floor},
            )
        )
    row = link["profiles"].get(LIVE)
    if row is not None:
        near, _, again = (p.get("cloud_calls_per_request") for p in row["phases"])
        far = row["phases"][1].get("cloud_calls_per_request")
        follows = None
        if near is not None and far is not None and again is not None:
            follows = far <= 0.05 * max(near, 1e-9) and again >= 0.8 * near
        adapt = [a["after_s"] for a in row["adapt_s"]]
        fast = bool(adapt) and all(a is not None and a <= GOAL_ADAPT_S for a in adapt)
        passed = (
            None
            if row["met"] is None or follows is None
            else (row["met"] >= GOAL_MET and follows and fast)
        )
        out.append(
            Goal(
                f"changing link (live: >= {100 * GOAL_MET:g}% met, cloud left and taken back "
                f"within {GOAL_ADAPT_S:g} s)",
                "",
                f"{pct(row['met'])} met; cloud calls per request {num(near, '.2f')} near, "
                f"{num(far, '.2f')} far, {num(again, '.2f')} near again; adapted in "
                + ", ".join(num(a, ".2f", " s") for a in adapt),
                passed,
                {
                    "met": row["met"],
                    "cloud_calls_per_request": [near, far, again],
                    "adapt_s": adapt,
                },
            )
        )
    return out


def _tight_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["profile", "deadline met", "accuracy", "p50 ms", "p99 ms", "cost/1k", "cloud calls"]
    body = []
    for r in report["tight"]:
        cloud = sum(
            n
            for tiers in r["member_calls"].values()
            for tier, outcomes in tiers.items()
            if tier == "cloud"
            for n in outcomes.values()
        )
        body.append(
            [
                r["profile"],
                pct(r["slo_attainment"]),
                num(r["accuracy"], ".4f"),
                num(r["latency_ms"]["p50"], ".2f"),
                num(r["latency_ms"]["p99"], ".2f"),
                num(r["cost_per_1k"], ".5f"),
                str(cloud),
            ]
        )
    return header, body


def _link_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = [
        "profile",
        "met (all)",
        *(f"met / accuracy / cloud calls per request ({p})" for p in PHASES),
        "adapted in",
    ]
    body = []
    for name, row in report["link"]["profiles"].items():
        phases = row["phases"]
        adapt = ", ".join(f"{a['cloud']} {num(a['after_s'], '.2f', ' s')}" for a in row["adapt_s"])
        body.append(
            [
                name,
                pct(row["met"]),
                *(
                    f"{pct(p['met'])} / {num(p['accuracy'], '.4f')} / "
                    f"{num(p.get('cloud_calls_per_request'), '.2f')}"
                    for p in phases
                ),
                adapt or "n/a",
            ]
        )
    return header, body


def summary(report: Report) -> str:
    """What the terminal shows at the end: both tables and the verdicts."""
    return "\n\n".join(
        [
            text_table(*_tight_table(report)),
            text_table(*_link_table(report)),
            goal_lines(goals_of(report)),
        ]
    )


def render_markdown(report: Report) -> str:
    s, link = report["settings"], report["link"]
    lines = [
        "# Live estimates under a tight deadline and a changing link",
        "",
        *header_lines(report),
        f"- config: `{s['config']}`; gateway exit code {report['gateway_exit_code']}",
        f"- load: open-loop Poisson, {s['rps']:g} req/s, HTTP binary tensors, one generator "
        "process; a deadline is met when the answer arrived within it, measured by the client "
        "from the intended send time",
        "",
        f"## 1. Tight deadline: `timeout` {s['tight_ms']:g} ms",
        "",
        f"Each profile alone, {s['warmup_s']:g} s warm-up + {s['duration_s']:g} s measured, the "
        "same arrivals and samples.",
        "",
        markdown_table(*_tight_table(report)),
        "",
        f"## 2. Changing link: `timeout` {link['deadline_ms']:g} ms",
        "",
        f"Each profile for {s['link_duration_s']:g} s (the same arrivals and samples); the cloud "
        f"round trip {s['near_ms']:g} ms, {s['far_ms']:g} ms from {link['changes_s'][0]:g} s, "
        f"{s['near_ms']:g} ms again from {link['changes_s'][1]:g} s. Cloud calls are read from "
        "/metrics every 0.25 s; adapted in: from the last reading before a change to the last "
        "cloud call after the link went far (stopped), or the first after it came near "
        "(resumed).",
        "",
        markdown_table(*_link_table(report)),
        "",
        "## Goals",
        "",
        "```",
        goal_lines(goals_of(report)),
        "```",
    ]
    return "\n".join(lines)
