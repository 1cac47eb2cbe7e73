"""The autoscaling experiment's arithmetic: replica timelines, cost, SLO attainment, reaction
time, goals and tables, from scraped samples and harness timelines (pure; `loadtest/autoscale.py`
runs the experiment)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.experiment import Goal, markdown_table, num
from loadtest.measure import Sample

ReplicaPoint = tuple[float, dict[str, int]]
"""Seconds since the measured run's start, and replicas per tier then."""

EDGE_SLOTS = 3
"""Ray Serve has no tiers: its first this many replicas are priced as edge, the rest as cloud
(the gateway's edge tier holds at most 3)."""
GOAL_REACT_S = 5.0
GOAL_COST_CUT = 0.30
SAME_ATTAINMENT = 0.01
"""Attainment within this (1 point) of static peak's counts as the same."""
GOAL_REACT = f"1 (p99 back under the SLO within {GOAL_REACT_S:g} s of the step)"
GOAL_CHEAPER = f"2 (>= {100 * GOAL_COST_CUT:g}% cheaper than static peak at the same attainment)"
HOST_STALL_MS = 100.0
"""A second in which the load generator's own send-lag p99 exceeded this was a host stall: the
generator (another process, on a machine the system under test barely loads here) could not
run, so neither could much else; such seconds are reported, and a second reaction time leaves
them out."""


def gateway_replicas(samples: Mapping[Sample, float]) -> dict[str, int]:
    """Replicas per tier in one /metrics scrape: the autoscaler's `current` gauge summed over
    members; without a control loop deciding (static), the replicas reporting readiness."""
    current: dict[str, int] = {}
    ready: dict[str, int] = {}
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if name == "ensemble_autoscaler_replicas" and tags.get("kind") == "current":
            current[tags["tier"]] = current.get(tags["tier"], 0) + round(value)
        elif name == "ensemble_replica_ready":
            ready.setdefault(tags["tier"], 0)
            ready[tags["tier"]] += value > 0
    return current or ready


def counter_by_tier(samples: Mapping[Sample, float], name: str) -> dict[str, float]:
    """A counter summed per `tier` label (e.g. ensemble_replica_seconds_total)."""
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            tier = dict(labels).get("tier", "")
            out[tier] = out.get(tier, 0.0) + value
    return out


def ray_replicas(csv_text: str, start_wall: float) -> list[ReplicaPoint]:
    """The Ray peer's `wall_time,running,total` lines as a timeline of total replicas (starting
    ones included: they are paid for), relative to the run's wall-clock start."""
    points: list[ReplicaPoint] = []
    for line in csv_text.splitlines()[1:]:
        parts = line.split(",")
        if len(parts) != 3:
            continue
        points.append((float(parts[0]) - start_wall, {"ray": int(parts[2])}))
    return points


def total(point: Mapping[str, int]) -> int:
    return sum(point.values())


def at(points: Sequence[ReplicaPoint], t: float) -> dict[str, int]:
    """Replicas per tier at ``t``: the last sample at or before it (else the first)."""
    found = points[0][1] if points else {}
    for when, tiers in points:
        if when > t:
            break
        found = tiers
    return found


def replica_seconds(points: Sequence[ReplicaPoint], end_s: float) -> dict[str, float]:
    """Per tier, the integral of the replica count over [0, end_s] (a step function)."""
    held: dict[str, float] = {}
    if not points or end_s <= 0:
        return held
    edges = [0.0] + [t for t, _ in points if 0 < t < end_s] + [end_s]
    for left, right in itertools.pairwise(edges):
        for tier, n in at(points, left).items():
            held[tier] = held.get(tier, 0.0) + n * (right - left)
    return held


def ray_priced_seconds(points: Sequence[ReplicaPoint], end_s: float) -> dict[str, float]:
    """Ray's replica-seconds split by the pricing rule: the first EDGE_SLOTS replicas as
    `edge`, the rest as `cloud`."""
    split = [
        (t, {"edge": min(total(x), EDGE_SLOTS), "cloud": max(0, total(x) - EDGE_SLOTS)})
        for t, x in points
    ]
    return replica_seconds(split, end_s)


def cost(seconds_by_tier: Mapping[str, float], prices: Mapping[str, float]) -> float:
    """Replica-seconds x the tier's price per replica-hour."""
    return sum(s * prices.get(tier, 0.0) / 3600 for tier, s in seconds_by_tier.items())


@dataclass(frozen=True)
class Step:
    """The load's jump up, for time to react: when it starts and ends (seconds)."""

    at_s: float
    until_s: float


def step_of(load: Any) -> Step | None:
    """The first rise of a step or spike load (None for other shapes)."""
    shape = getattr(load, "shape", None)
    if shape == "spike":
        return Step(load.spike_at_s, load.spike_at_s + load.spike_duration_s)
    if shape == "step":
        steps = sorted(load.steps, key=lambda s: s.at_s)
        for before, after in itertools.pairwise(steps):
            if after.rps > before.rps:
                later = [s.at_s for s in steps if s.at_s > after.at_s]
                return Step(after.at_s, later[0] if later else load.duration_s)
    return None


def first_scale_up_s(points: Sequence[ReplicaPoint], step: Step) -> float | None:
    """Seconds from the step to the first sample with more replicas than at the step."""
    base = total(at(points, step.at_s))
    for t, tiers in points:
        if step.at_s <= t <= step.until_s and total(tiers) > base:
            return t - step.at_s
    return None


def _bad_second(row: Mapping[str, Any], slo_ms: float) -> bool:
    p99 = row["latency_ms"]["p99"]
    return bool(row["errors"]) or (p99 is not None and p99 > slo_ms)


def stalled(second: Mapping[str, Any]) -> bool:
    """Whether this second of a harness timeline was a host stall (``HOST_STALL_MS``)."""
    lag = second.get("lag_p99_ms")
    return lag is not None and lag > HOST_STALL_MS


def stall_seconds(timeline: Sequence[Mapping[str, Any]]) -> int:
    return sum(stalled(r) for r in timeline)


def recovery_s(
    timeline: Sequence[Mapping[str, Any]], step: Step, slo_ms: float, *, skip_stalls: bool = False
) -> float | None:
    """Seconds from the step until the per-second p99 is under the SLO (and no request
    failed) and stays so until the step ends; 0 if it never left; None if it never came back.
    With ``skip_stalls``, seconds that were host stalls do not count either way."""
    rows = [
        r
        for r in timeline
        if step.at_s <= r["t"] < step.until_s and not (skip_stalls and stalled(r))
    ]
    bad = [r["t"] for r in rows if _bad_second(r, slo_ms)]
    if not bad:
        return 0.0
    back = max(bad) + 1
    return None if back >= step.until_s else back - step.at_s


def bad_seconds(timeline: Sequence[Mapping[str, Any]], slo_ms: float) -> int:
    """Seconds whose p99 exceeded the SLO or that had failed requests."""
    return sum(_bad_second(r, slo_ms) for r in timeline)


def attainment(sent: int, within: int) -> float | None:
    return within / sent if sent else None


def _reaction_goal(r: Mapping[str, Any]) -> Goal:
    rec = r["recovery_s"]
    quiet = r.get("recovery_excl_stalls_s", rec)
    met_quiet = quiet is not None and quiet <= GOAL_REACT_S
    measured = "never" if rec is None else f"{rec:g} s"
    if quiet != rec:
        shown = "never" if quiet is None else f"{quiet:g} s"
        measured += f"; host stalls left out: {shown} ({'met' if met_quiet else 'NOT met'})"
    values = {"recovery_s": rec, "recovery_excl_stalls_s": quiet, "met_excl_stalls": met_quiet}
    subject = f"{r['scenario']}/{r['system']}"
    return Goal(GOAL_REACT, subject, measured, rec is not None and rec <= GOAL_REACT_S, values)


def _cost_goal(r: Mapping[str, Any], ref: Mapping[str, Any]) -> Goal:
    share = r["cost"] / ref["cost"]
    mine, static = r["slo_attainment"] or 0, ref["slo_attainment"] or 0
    points = 100 * (mine - static)
    same = mine >= static - SAME_ATTAINMENT
    measured = f"{100 * share:.0f}% of its cost, attainment {points:+.2f} points"
    values = {
        "cost_share_of_static": round(share, 4),
        "attainment_vs_static_points": round(points, 2),
    }
    subject = f"{r['scenario']}/{r['system']}"
    return Goal(GOAL_CHEAPER, subject, measured, same and share <= 1 - GOAL_COST_CUT, values)


def goals(rows: Sequence[Mapping[str, Any]], static: str = "static") -> list[Goal]:
    """Per scenario and system: p99 back under the SLO within GOAL_REACT_S of the step; cost at
    least GOAL_COST_CUT below static peak's at the same attainment (within SAME_ATTAINMENT)."""
    peak = {r["scenario"]: r for r in rows if r["system"] == static}
    others = [r for r in rows if r["system"] != static]
    react = [_reaction_goal(r) for r in others if r.get("recovery_s", "n/a") != "n/a"]
    cost = [
        _cost_goal(r, peak[r["scenario"]])
        for r in others
        if r["scenario"] in peak and peak[r["scenario"]]["cost"]
    ]
    return react + cost


def _scale_up(value: float | str | None) -> str:
    if value is None:
        return "none"  # no more replicas during the step than at its start
    return value if isinstance(value, str) else f"{value:.1f}"


def _row_cells(r: Mapping[str, Any], static_cost: float | None) -> list[object]:
    secs = r["replica_seconds_priced"]
    vs = f"{100 * r['cost'] / static_cost:.0f} %" if static_cost else "n/a"
    rec = r["recovery_s"]
    quiet = ""
    if r.get("stall_seconds") and rec != "n/a":
        left_out = r.get("recovery_excl_stalls_s")
        quiet = f" ({_reaction(left_out)} without {r['stall_seconds']} stall s)"
    share = r["slo_attainment"]
    cores = r.get("cores", {})
    return [
        r["scenario"],
        r["system"],
        f"{num(None if share is None else 100 * share, '.2f')} %",
        num(r["latency_ms"]["p99"], ".0f"),
        r["errors"],
        f"{secs.get('edge', 0):.0f} / {secs.get('cloud', 0):.0f} "
        f"({sum(r['replica_seconds'].values()):.0f})",
        f"{r['cost']:.5f}",
        vs,
        _scale_up(r["first_scale_up_s"]),
        f"{_reaction(rec)}{quiet}",
        r["bad_seconds"],
        r["peak_replicas"],
        f"{num(r.get('send_lag_p99_ms'), '.0f')}, {num(cores.get('others'), '.2f')}, "
        f"{num(cores.get('steal'), '.2f')}",
    ]


def table(rows: Sequence[Mapping[str, Any]], slo_ms: float) -> str:
    """The Markdown table of every (scenario, system) run."""
    header = [
        "scenario", "system", f"SLO attainment (<= {slo_ms:g} ms)", "p99 ms", "errors",
        "replica-s edge / cloud (all)", "cost", "cost vs static", "first scale-up s",
        "p99 back under SLO s (host stalls left out)", "bad s", "peak replicas",
        "send lag p99 ms, other cores, steal cores",
    ]  # fmt: skip
    peak = {r["scenario"]: r["cost"] for r in rows if r["system"] == "static"}
    return markdown_table(header, [_row_cells(r, peak.get(r["scenario"])) for r in rows])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _median_reaction(values: Sequence[float | str | None]) -> float | str | None:
    """The median reaction time: "n/a" without a step, None (never) counting as the latest."""
    timed = [math.inf if x is None else float(x) for x in values if x != "n/a"]
    if not timed:
        return "n/a"
    late = _median(timed)
    return None if math.isinf(late) else late


def median_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (scenario, system) over repeated runs: the median of each measure on its own
    (attainment, p99, cost, reaction, bad seconds), with every run's value under ``values``.
    A reaction that never came counts as infinitely late; the rows suit ``goals``."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            grouped.setdefault((row["scenario"], row["system"]), []).append(row)
    out = []
    for (scenario, system), rows in grouped.items():
        recoveries = [r.get("recovery_s", "n/a") for r in rows]
        quiet = [r.get("recovery_excl_stalls_s", r.get("recovery_s", "n/a")) for r in rows]
        values = {
            "slo_attainment": [r["slo_attainment"] or 0.0 for r in rows],
            "p99_ms": [r["latency_ms"]["p99"] or math.inf for r in rows],
            "cost": [r["cost"] for r in rows],
            "bad_seconds": [r["bad_seconds"] for r in rows],
            "steal": [r.get("cores", {}).get("steal") for r in rows],
        }
        out.append(
            {
                "scenario": scenario,
                "system": system,
                "runs": len(rows),
                "slo_attainment": _median(values["slo_attainment"]),
                "p99_ms": _median(values["p99_ms"]),
                "cost": _median(values["cost"]),
                "bad_seconds": _median(values["bad_seconds"]),
                "recovery_s": _median_reaction(recoveries),
                "recovery_excl_stalls_s": _median_reaction(quiet),
                "values": {**values, "recovery_s": recoveries, "recovery_excl_stalls_s": quiet},
            }
        )
    return out


def _reaction(value: float | str | None) -> str:
    return "never" if value is None else value if isinstance(value, str) else f"{value:.0f}"


def median_table(rows: Sequence[Mapping[str, Any]], slo_ms: float) -> str:
    """The Markdown table of ``median_rows``: each median with every run's value after it."""

    def each(values: Sequence[Any], spec: str, none: str = "n/a") -> str:
        return ", ".join(
            none if v is None else v if isinstance(v, str) else num(v, spec) for v in values
        )

    header = [
        "scenario", "system", "runs", f"SLO attainment (<= {slo_ms:g} ms): median (each)",
        "p99 ms", "cost vs static: median (each)", "p99 back under SLO s: median (each)",
        "same, host stalls left out", "bad s", "steal cores (each)",
    ]  # fmt: skip
    peak = {r["scenario"]: r["cost"] for r in rows if r["system"] == "static"}
    cells = []
    for r in rows:
        v, ref = r["values"], peak.get(r["scenario"])
        shares = [100 * c / ref for c in v["cost"]] if ref else []
        rec, quiet = r["recovery_s"], r.get("recovery_excl_stalls_s", "n/a")
        attained = each([100 * a for a in v["slo_attainment"]], ".1f")
        cells.append(
            [
                r["scenario"],
                r["system"],
                r["runs"],
                f"{100 * r['slo_attainment']:.2f} % ({attained})",
                num(r["p99_ms"], ".0f"),
                f"{num(100 * r['cost'] / ref if ref else None, '.0f')} % ({each(shares, '.0f')})",
                f"{_reaction(rec)} ({each(v['recovery_s'], '.0f', 'never')})",
                f"{_reaction(quiet)} ({each(v.get('recovery_excl_stalls_s', []), '.0f', 'never')})",
                num(r["bad_seconds"], ".0f"),
                each(v["steal"], ".2f"),
            ]
        )
    return markdown_table(header, cells)
