"""The fault experiment's pages and verdicts: gateway counters, goals, tables, report.md.

Pure functions of scraped samples and report rows; `loadtest/resilience.py` runs the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.experiment import (
    Goal,
    Report,
    by_name,
    goal_lines,
    goals_of,
    header_lines,
    markdown_table,
    num,
    pct,
)
from loadtest.measure import Sample, total

GOAL_ANSWERED = 0.999
GOAL_RECOVERY_S = 5.0
ANSWERED = f"answered (>= {100 * GOAL_ANSWERED:g}% of requests, degraded allowed)"
RECOVERED = f"recovery (<= {GOAL_RECOVERY_S:g} s after the fault ends)"


def gateway_counters(change: Mapping[Sample, float]) -> dict[str, int]:
    """What the gateway did about the fault, from its /metrics over the measured run."""
    calls = int(total(change, "ensemble_member_calls_total"))
    succeeded = int(total(change, "ensemble_member_calls_total", outcome="success"))
    return {
        "retries": int(total(change, "ensemble_retries_total")),
        "hedges_sent": int(total(change, "ensemble_hedges_total", outcome="sent")),
        "hedges_won": int(total(change, "ensemble_hedges_total", outcome="won")),
        "ejections": int(total(change, "ensemble_replica_ejections_total")),
        "degraded_answers": int(total(change, "ensemble_degraded_answers_total")),
        "failed_member_calls": calls - succeeded,
    }


def goals(rows: Sequence[Mapping[str, Any]]) -> list[Goal]:
    """Per fault: answered share and time to recover against their goals."""
    out = []
    for r in rows:
        share, rec = r["run"]["answered_share"], r["recovery_s"]
        out.append(
            Goal(
                ANSWERED,
                r["fault"],
                f"{pct(share)} answered",
                share is not None and share >= GOAL_ANSWERED,
                {"answered_share": share},
            )
        )
    for r in rows:
        rec = r["recovery_s"]
        measured = "never" if rec is None else f"{rec:.2f} s"
        passed = rec is not None and rec <= GOAL_RECOVERY_S
        out.append(Goal(RECOVERED, r["fault"], measured, passed, {"recovery_s": rec}))
    return out


def table(report: Report) -> str:
    """The Markdown table of the faults."""
    verdicts: dict[str, list[str]] = {}
    for group in by_name(goals_of(report)).values():
        for g in group:
            if g.passed:
                verdicts.setdefault(g.subject, []).append(g.name.split(" ")[0])
    header = [
        "fault", "sent", "answered", "degraded", "errors", "p50 / p99 ms (run)",
        "p99 ms in fault window", "fault window s", "time to recover", "goals",
    ]  # fmt: skip
    rows = []
    for r in report["faults"]:
        run, win = r["run"], r["window"]
        errors = ", ".join(f"{n} {k}" for k, n in run["errors"].items()) or "0"
        met = verdicts.get(r["fault"], [])
        goals_cell = (
            "both met" if len(met) == 2 else ("met: " + ", ".join(met) if met else "not met")
        )
        rows.append(
            [
                r["fault"],
                run["sent"],
                pct(run["answered_share"]),
                pct(run["degraded_share"]),
                errors,
                f"{num(run['latency_ms']['p50'], '.1f')} / {num(run['latency_ms']['p99'], '.1f')}",
                num(win["latency_ms"]["p99"], ".1f"),
                f"{win['start_s']:.2f}-{win['end_s']:.2f}",
                num(r["recovery_s"], ".2f", " s"),
                goals_cell,
            ]
        )
    return markdown_table(header, rows)


def per_fault(report: Report) -> str:
    """The Markdown table of the fault windows and what the gateway did in each run."""
    header = [
        "fault", "window: sent / answered / degraded", "baseline p99 ms", "threshold ms",
        "retries", "hedges sent (won)", "ejections", "failed member calls",
        "cores: ours / others",
    ]  # fmt: skip
    rows = []
    for r in report["faults"]:
        w, g = r["window"], r["gateway"]
        rows.append(
            [
                r["fault"],
                f"{w['sent']} / {pct(w['answered_share'])} / {pct(w['degraded_share'])}",
                num(r["baseline"]["latency_ms"]["p99"], ".1f"),
                f"{r['threshold_ms']:.1f}",
                g["retries"],
                f"{g['hedges_sent']} ({g['hedges_won']})",
                g["ejections"],
                g["failed_member_calls"],
                f"{r['cores']['ours']:.2f} / {r['cores']['others']:.2f}",
            ]
        )
    return markdown_table(header, rows)


def summary(report: Report) -> str:
    return f"{table(report)}\n\n{goal_lines(goals_of(report))}"


def render_markdown(report: Report) -> str:
    s, rule = report["settings"], report["settings"]["rule"]
    lines = [
        "# Faults under load",
        "",
        *header_lines(report),
        f"- config: `{s['config']}` (filled copies under each fault's directory)",
        f"- load per fault: {s['warmup_s']:g} s warm-up, then constant {s['rps']:g} req/s for "
        f"{s['duration_s']:g} s, fault at {s['fault_at_s']:g} s for {s['fault_s']:g} s; HTTP "
        f"binary tensors, one generator in this process; request `timeout` {s['deadline_ms']:g} ms",
        f"- recovered: {rule['window']} requests in a row answered, not degraded, within "
        f"max({rule['latency_factor']:g} x pre-fault p99, {rule['min_threshold_ms']:g} ms); "
        f"baseline from {rule['baseline_from_s']:g} s to the fault",
        "",
        table(report),
        "",
        "```",
        goal_lines(goals_of(report)),
        "```",
        "",
        "## Per fault",
        "",
        per_fault(report),
        "",
    ]
    for r in report["faults"]:
        lines += [f"### {r['fault']}: {r['description']}", ""]
        lines += [f"- {mk['at_s']:.2f} s: `{mk['name']}` {mk['message']}" for mk in r["marks"]]
        if not r["fault_applied"]:
            lines.append("- **the fault was not applied** (see the marks)")
        lines.append("")
    return "\n".join(lines)
