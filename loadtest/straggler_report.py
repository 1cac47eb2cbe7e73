"""The straggler experiment's arithmetic and pages: cost from /metrics, goals, tables, report.md.

Pure functions of scraped samples and report rows; `loadtest/straggler.py` runs the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.experiment import (
    Goal,
    Report,
    goal_lines,
    goals_of,
    header_lines,
    markdown_table,
    num,
)
from loadtest.measure import Sample, named

REFERENCE = "all"
"""The all-members profile the cost and accuracy goal compares against."""
NOHEDGE = "_nohedge"
"""`X_nohedge` is profile X without hedging; the hedging goal compares the two."""
GOAL_ATTAINMENT = 0.99
GOAL_ACCURACY_POINTS = 0.5
GOAL_COST_SHARE = 0.5
GOAL_P99_CUT = 5.0
GOAL_EXTRA_CALLS_PCT = 5.0
GOAL_COST = (
    f"1 (>= {100 * GOAL_ATTAINMENT:g}% SLO attainment, accuracy within {GOAL_ACCURACY_POINTS:g} "
    f"points of `{REFERENCE}`, <= {100 * GOAL_COST_SHARE:g}% of its cost)"
)
GOAL_HEDGING = (
    f"2 (hedging cuts p99 >= {GOAL_P99_CUT:g}x for <= {GOAL_EXTRA_CALLS_PCT:g}% extra calls, "
    "every pair)"
)
BUSY_CORES = 0.2
"""Warn when other processes used more than this many cores during a measured run."""


@dataclass(frozen=True)
class Prices:
    """Tier prices of the config, for costing member calls when the gateway exports no cost."""

    tier: dict[str, float]
    hedge: dict[str, float]
    """Per member: the price of a hedge or retry, the dearest tier it has replicas on (both are
    counted by member only, so their replica is not known)."""
    model: str

    @classmethod
    def of(cls, config: Path) -> Prices:
        from ensemble.config import load_config

        cfg = load_config(config)
        tier = {name: t.cost_per_request for name, t in cfg.tiers.items()}
        hedge = {
            m.name: max(tier[p.tier] for p in m.placement) for e in cfg.ensembles for m in e.members
        }
        return cls(tier, hedge, cfg.ensembles[0].name)


def gateway_counts(change: Mapping[Sample, float], prices: Prices) -> dict[str, Any]:
    """A profile's member calls, hedges and cost from the /metrics deltas of its run."""
    calls: dict[str, dict[str, dict[str, int]]] = {}
    priced = 0.0
    for labels, value in named(change, "ensemble_member_calls_total"):
        member, tier, outcome = labels["member"], labels["tier"], labels["outcome"]
        calls.setdefault(member, {}).setdefault(tier, {})[outcome] = int(value)
        priced += value * prices.tier.get(tier, 0.0)
    hedges: dict[str, dict[str, int]] = {}
    for labels, value in named(change, "ensemble_hedges_total"):
        outcomes = hedges.setdefault(labels["member"], {})  # summed over tiers
        outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0) + int(value)
        if labels["outcome"] == "sent":
            priced += value * prices.hedge.get(labels["member"], 0.0)
    retries: dict[str, int] = {}
    for labels, value in named(change, "ensemble_retries_total"):
        retries[labels["member"]] = retries.get(labels["member"], 0) + int(value)
        priced += value * prices.hedge.get(labels["member"], 0.0)
    exported = [
        v
        for labels, v in named(change, "ensemble_cost_total")
        if prices.model in (labels.get("ensemble"), labels.get("model"))
    ]
    asked = sum(v for _, v in named(change, "ensemble_members_asked_total"))
    return {
        "member_calls": calls,
        "calls": sum(n for tiers in calls.values() for o in tiers.values() for n in o.values()),
        "hedges": hedges,
        "hedges_sent": sum(h.get("sent", 0) for h in hedges.values()),
        "hedges_won": sum(h.get("won", 0) for h in hedges.values()),
        "retries": sum(retries.values()),
        "members_asked": int(asked),
        "cost": sum(exported) if exported else priced,
        "cost_source": "ensemble_cost_total" if exported else "member calls x tier prices",
        "cost_from_calls": priced,
    }


def learned_weights(samples: Mapping[Sample, float], profile: str) -> dict[str, float]:
    """Member weights a profile learned (Exp4's), as the gateway exports them."""
    return {
        labels["member"]: round(v, 4)
        for labels, v in named(samples, "ensemble_selection_weight")
        if labels.get("profile") == profile
    }


# --- goals -------------------------------------------------------------------------------------


def _cost_goal(row: Mapping[str, Any], ref: Mapping[str, Any]) -> Goal:
    # Within 0.5 points: at most 0.5 below the reference (more accurate is fine).
    points = 100 * (row["accuracy"] - ref["accuracy"])
    share = row["cost_per_1k"] / ref["cost_per_1k"]
    ok = (
        row["slo_attainment"] >= GOAL_ATTAINMENT
        and points >= -GOAL_ACCURACY_POINTS
        and share <= GOAL_COST_SHARE
    )
    measured = (
        f"attainment {100 * row['slo_attainment']:.2f}%, accuracy {points:+.2f} points vs "
        f"{REFERENCE}, {100 * share:.1f}% of its cost"
    )
    values = {
        "slo_attainment": row["slo_attainment"],
        "accuracy_points_vs_reference": round(points, 3),
        "cost_share_of_reference": round(share, 4),
    }
    return Goal(GOAL_COST, row["profile"], measured, ok, values, need="any")


def _hedging_goal(hedged: Mapping[str, Any], plain: Mapping[str, Any]) -> Goal:
    fast, slow = hedged["latency_ms"]["p99"], plain["latency_ms"]["p99"]
    cut = slow / fast if fast and slow else None
    extra = hedged["extra_calls_pct"]
    ok = cut is not None and cut >= GOAL_P99_CUT and extra is not None
    ok = ok and extra <= GOAL_EXTRA_CALLS_PCT
    measured = (
        f"p99 {num(slow, '.1f')} -> {num(fast, '.1f')} ms ({num(cut, '.2f')}x), "
        f"{num(extra, '.2f')}% extra calls"
    )
    values = {
        "p99_ms_unhedged": slow,
        "p99_ms_hedged": fast,
        "p99_cut": None if cut is None else round(cut, 3),
        "extra_calls_pct": extra,
    }
    return Goal(GOAL_HEDGING, f"{hedged['profile']} vs {plain['profile']}", measured, ok, values)


def goals(rows: Sequence[Mapping[str, Any]]) -> list[Goal]:
    """Both goals, computed from the rows (never assumed): cost and accuracy per profile
    against `all` (met when one profile meets it), hedging per X / X_nohedge pair (when all
    pairs do)."""
    by_profile = {r["profile"]: r for r in rows}
    ref = by_profile.get(REFERENCE)
    out: list[Goal] = []
    if ref is not None and ref["accuracy"] is not None and ref["cost_per_1k"]:
        out += [
            _cost_goal(r, ref)
            for r in rows
            if r["profile"] != REFERENCE
            and r["slo_attainment"] is not None
            and r["accuracy"] is not None
        ]
    if not out:
        out.append(Goal(GOAL_COST, "", f"no profile to compare with `{REFERENCE}`", None))
    pairs = [
        (r, by_profile[r["profile"] + NOHEDGE])
        for r in rows
        if r["profile"] + NOHEDGE in by_profile
    ]
    out += [_hedging_goal(hedged, plain) for hedged, plain in pairs]
    if not pairs:
        out.append(Goal(GOAL_HEDGING, "", f"no X / X{NOHEDGE} pair of profiles", None))
    return out


# --- pages -------------------------------------------------------------------------------------


def table(report: Report) -> str:
    """The Markdown table of the profiles."""
    slo = report["settings"]["slo_ms"]
    header = [
        "profile", f"SLO attainment (<= {slo:g} ms)", "accuracy", "cost / 1,000 req",
        "p50 ms", "p99 ms", "hedges sent (extra calls)", "member calls / req", "errors",
    ]  # fmt: skip
    rows = []
    for r in report["profiles"]:
        attainment = r["slo_attainment"]
        rows.append(
            [
                r["profile"],
                f"{num(None if attainment is None else 100 * attainment, '.2f')} %",
                num(r["accuracy"], ".4f"),
                num(r["cost_per_1k"], ".4f"),
                num(r["latency_ms"]["p50"], ".2f"),
                num(r["latency_ms"]["p99"], ".2f"),
                f"{r['hedges_sent']} ({num(r['extra_calls_pct'], '.2f')} %)",
                num(r["calls_per_request"], ".2f"),
                sum(r["errors"].values()),
            ]
        )
    return markdown_table(header, rows)


def where_it_went(report: Report) -> str:
    """The Markdown table of members asked, hedges won, CPU and cores per profile."""
    header = [
        "profile", "members asked / req", "hedges won", "retries", "gateway CPU ms / req",
        "cores: gateway / generator / others", "send lag p99 ms", "cost from",
    ]  # fmt: skip
    rows = [
        [
            r["profile"],
            num(r["members_asked_per_request"], ".2f"),
            r["hedges_won"],
            r["retries"],
            num(r["gateway_cpu_ms_per_request"], ".2f"),
            f"{r['gateway_cores']:.2f} / {r['generator_cores']:.2f} / {r['other_cores']:.2f}",
            num(r["generator"]["send_lag_ms"]["p99"], ".2f"),
            r["cost_source"],
        ]
        for r in report["profiles"]
    ]
    return markdown_table(header, rows)


def summary(report: Report) -> str:
    """What the terminal shows at the end: the table and the verdicts."""
    return f"{table(report)}\n\n{goal_lines(goals_of(report))}"


def render_markdown(report: Report) -> str:
    s = report["settings"]
    lines = [
        "# Policy profiles under a straggler replica",
        "",
        *header_lines(report),
        f"- config: `{s['config']}`; straggler: {report['straggler']}",
        f"- load: open-loop Poisson, {s['rps']:g} req/s, {s['warmup_s']:g} s warm-up + "
        f"{s['duration_s']:g} s measured per profile, HTTP binary tensors, one generator "
        f"process (the harness's own client); feedback share {s['feedback_share']:g}",
        f"- requests carry `timeout` {s['deadline_ms']:g} ms; SLO: answered within "
        f"{s['slo_ms']:g} ms; gateway exit code {report['gateway_exit_code']}",
        "",
        table(report),
        "",
        "```",
        goal_lines(goals_of(report)),
        "```",
        "",
        "## Where the time and calls went",
        "",
        where_it_went(report),
        "",
    ]
    warned = [(r["profile"], w) for r in report["profiles"] for w in r["warnings"]]
    busy = [r["profile"] for r in report["profiles"] if r["other_cores"] > BUSY_CORES]
    if busy:
        warned.append(
            (", ".join(busy), f"other processes used more than {BUSY_CORES:g} cores meanwhile")
        )
    if warned:
        lines += ["## Warnings", ""] + [f"- {p}: {w}" for p, w in warned] + [""]
    return "\n".join(lines)
