"""Goodput under overload: find the gateway's capacity, then offer a multiple of it once per
admission setting and compare goodput (README: "Overload and admission")."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loadtest.experiment import (
    CONFIGS,
    ROOT,
    SCENARIOS,
    Driver,
    Goal,
    Report,
    Run,
    add_common,
    goal_lines,
    goals_doc,
    goals_of,
    header_lines,
    markdown_table,
    new_parser,
    progress,
    settings_doc,
    split_list,
    write_report,
)
from loadtest.peers import machine_steal_seconds

NAME = "overload"
CAPACITY_SCENARIO = SCENARIOS / "overload_capacity.yaml"
OVERLOAD_SCENARIO = SCENARIOS / "overload_2x.yaml"
CONFIGS_BY_ADMISSION = {
    "default": ROOT / "configs" / "local.yaml",  # the quickstart's admission, whatever it is
    **{name: CONFIGS / f"overload_{name}.yaml" for name in ("bounded", "adaptive", "off")},
}
GOAL_SHARE = 0.9
"""The goal: goodput at the overload at least this share of the capacity, with the default."""
GOODPUT_SHARE = 0.9
"""A rate is within capacity when its goodput is at least this share of it (and p99 holds)."""

DESCRIPTION = f"""\
Goodput under overload.

Measures the goodput capacity of configs/local.yaml's ensemble without admission control
(loadtest/configs/overload_off.yaml; open-loop Poisson at --rates; the highest goodput among
rates whose p99 stays within --p99-ms and whose goodput is at least {100 * GOODPUT_SHARE:g}% of
the rate), then offers --factor times it once per admission setting (`default`:
configs/local.yaml as shipped; loadtest/configs/overload_{{bounded,adaptive,off}}.yaml) and
prints goodput as a share of capacity. Every run is `python -m loadtest.cli SCENARIO` (the
`ensemble loadtest` command) with the running interpreter, on a gateway it starts; every
measurement runs --repeats times and the median run is reported.
Goal: with the default admission, goodput at the overload >= {100 * GOAL_SHARE:g}% of capacity.
Writes OUT/report.json, OUT/report.md and each run's harness report under OUT/<setting>-<i>/.
Exit 0 when the runs completed (whatever the goal says), 1 when no rate met the capacity
bound, 2 when they could not run.
"""


class NoCapacity(RuntimeError):
    """No rate of the staircase met the capacity bound."""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    rates: tuple[float, ...] = (400, 600, 800, 1000, 1200)
    capacity_rps: float | None = None
    """Skip the search and use this capacity."""
    factor: float = 2.0
    duration_s: float = 10.0
    repeats: int = 2
    generators: int = 3
    p99_ms: float = 100.0
    admissions: tuple[str, ...] = ("default", "bounded", "off")
    out: Path | None = None


def say(line: str) -> None:
    progress(NAME, line)


def run_once(
    scenario: Path, config: Path, rps: float, duration_s: float, generators: int, out: Path
) -> dict[str, Any] | None:
    """One harness run of ``scenario`` at ``rps`` against ``config``; its report (None when it
    could not start three times)."""
    doc = yaml.safe_load(scenario.read_text())
    doc["target"] = {"config": str(config)}
    doc["load"] = {"shape": "poisson", "rps": rps, "duration_s": duration_s}
    doc["generators"] = generators
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    command = [sys.executable, "-m", "loadtest.cli", str(path), "--out", str(out), "--quiet"]
    for _ in range(3):  # a run that could not start (exit 2, no report) is tried again
        started, steal = time.monotonic(), machine_steal_seconds()
        subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        if (out / "report.json").exists():
            report: dict[str, Any] = json.loads((out / "report.json").read_text())
            # Cores the hypervisor took away meanwhile (start-up and drain included).
            report["steal_cores"] = (machine_steal_seconds() - steal) / (time.monotonic() - started)
            return report
    say(f"{path}: no report after 3 attempts (see {out}); run skipped")
    return None


def row(report: dict[str, Any] | None, rps: float) -> dict[str, Any] | None:
    """The numbers the comparison needs from one report (None: the run could not start)."""
    if report is None:
        return None
    sent = report["requests"]["sent"]
    errors = report["errors"]
    shed = errors.get("http_429", 0)
    gen = report["generator"]
    return {
        "offered_rps": rps,
        "sent": sent,
        "throughput_rps": report["throughput_rps"],
        "goodput_rps": report["goodput_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "shed_pct": 100 * shed / sent if sent else 0.0,
        "errors": {k: v for k, v in errors.items() if v},
        "send_lag_p99_ms": gen["send_lag_ms"]["p99"],
        "generator_saturated": gen["generator_saturated"],
        "steal_cores": report.get("steal_cores"),
    }


def median_row(rows: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The run with the median goodput, the lower of the middle two (every run is kept in the
    JSON); runs that could not start are left out."""
    ordered = sorted((r for r in rows if r is not None), key=lambda r: r["goodput_rps"])
    if not ordered:
        raise RuntimeError("no run of this measurement could start")
    return ordered[(len(ordered) - 1) // 2]


def _repeat(
    settings: Settings, scenario: Path, config: Path, rps: float, out: Path, label: str
) -> list[dict[str, Any] | None]:
    return [
        row(
            run_once(scenario, config, rps, settings.duration_s, settings.generators,
                     out / f"{label}-{i}"),
            rps,
        )
        for i in range(settings.repeats)
    ]  # fmt: skip


def find_capacity(settings: Settings, out: Path, runs: dict[str, Any]) -> float:
    """The highest median goodput of the staircase's rates that stay within the bound."""
    best = 0.0
    for rps in settings.rates:
        rows = _repeat(settings, CAPACITY_SCENARIO, CONFIGS_BY_ADMISSION["off"], rps, out,
                       f"capacity-{rps:g}")  # fmt: skip
        runs[f"{rps:g}"] = rows
        med = median_row(rows)
        ok = med["p99_ms"] is not None and med["p99_ms"] <= settings.p99_ms
        ok = ok and med["goodput_rps"] >= GOODPUT_SHARE * rps
        say(f"capacity search {rps:g} req/s: {_line(med)} -> {'ok' if ok else 'over'}")
        if ok:  # no early stop: on a shared machine a noisy step may fail below capacity
            best = max(best, med["goodput_rps"])
    if not best:
        raise NoCapacity("no rate met the capacity bound; try lower --rates")
    return best


def run(settings: Settings, command: str = "") -> Report:
    """The capacity (searched or given), then every admission setting at the overload."""
    unknown = [a for a in settings.admissions if a not in CONFIGS_BY_ADMISSION]
    if unknown:
        raise ValueError(f"unknown admission(s) {', '.join(unknown)}")
    this = Run(NAME, settings.out, command)
    out = this.out.resolve()
    capacity_runs: dict[str, Any] = {}
    capacity = settings.capacity_rps or find_capacity(settings, out, capacity_runs)
    offered = round(settings.factor * capacity)
    say(f"capacity {capacity:.0f} req/s; offering {offered} req/s ({settings.factor:g}x)")
    overload_runs: dict[str, Any] = {}
    medians: dict[str, dict[str, Any]] = {}
    for name in settings.admissions:
        rows = _repeat(settings, OVERLOAD_SCENARIO, CONFIGS_BY_ADMISSION[name], offered, out, name)
        overload_runs[name] = rows
        medians[name] = median_row(rows)
        goodputs = ", ".join(
            f"{r['goodput_rps']:.0f} (steal {_steal(r)})" if r else "failed" for r in rows
        )
        say(f"{name}: {_line(medians[name])} (goodput, steal in cores, of each run: {goodputs})")
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(out)),
        "capacity_rps": capacity,
        "offered_rps": offered,
        "capacity_runs": capacity_runs,
        "overload_runs": overload_runs,
        "medians": medians,
        "goals": goals_doc(goals(medians, capacity, settings.factor)),
    }
    return write_report(out, report, render_markdown(report))


def goals(medians: dict[str, dict[str, Any]], capacity: float, factor: float) -> list[Goal]:
    """The default admission's goodput at the overload against the capacity."""
    med = medians.get("default")
    if med is None:
        return []
    share = med["goodput_rps"] / capacity
    name = f"goodput at {factor:g}x capacity >= {100 * GOAL_SHARE:g}% of capacity"
    measured = f"{med['goodput_rps']:.0f} of {capacity:.0f} req/s ({100 * share:.0f} %)"
    return [Goal(name, "default", measured, share >= GOAL_SHARE, {"share": round(share, 4)})]


def table(report: Report) -> str:
    capacity, offered = report["capacity_rps"], report["offered_rps"]
    header = [
        "admission", "capacity req/s", "offered req/s", "goodput req/s", "goodput / capacity",
        "p99 of admitted ms", "shed %", "other errors", "send lag p99 ms", "generator kept up",
        "steal (cores)",
    ]  # fmt: skip
    rows = []
    for name, med in report["medians"].items():
        other = {k: v for k, v in med["errors"].items() if k != "http_429"}
        rows.append(
            [
                name, f"{capacity:.0f}", offered, f"{med['goodput_rps']:.0f}",
                f"{100 * med['goodput_rps'] / capacity:.0f} %", med["p99_ms"],
                f"{med['shed_pct']:.1f}", other or 0, med["send_lag_p99_ms"],
                "no" if med["generator_saturated"] else "yes", _steal(med),
            ]
        )  # fmt: skip
    return markdown_table(header, rows)


def summary(report: Report) -> str:
    return f"{table(report)}\n\n{goal_lines(goals_of(report))}"


def render_markdown(report: Report) -> str:
    s = report["settings"]
    lines = [
        "# Goodput under overload",
        "",
        *header_lines(report),
        f"- capacity: {report['capacity_rps']:.0f} req/s; offered {report['offered_rps']} req/s "
        f"({s['factor']:g}x), {s['duration_s']:g} s per run, {s['repeats']} run(s) per "
        f"measurement (the median shown), {s['generators']} generator processes",
        "",
        summary(report),
        "",
    ]
    return "\n".join(lines)


def _steal(r: dict[str, Any]) -> str:
    return "n/a" if r.get("steal_cores") is None else f"{r['steal_cores']:.2f}"


def _line(r: dict[str, Any]) -> str:
    return (
        f"goodput {r['goodput_rps']:.0f} req/s, p99 {r['p99_ms']} ms, shed {r['shed_pct']:.1f} %, "
        f"errors {r['errors']}, send lag p99 {r['send_lag_p99_ms']} ms, steal {_steal(r)} cores"
        f"{' (generator saturated)' if r['generator_saturated'] else ''}"
    )


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME, seed=False, quiet=False)
    d = Settings()
    add = parser.add_argument
    add("--rates", default=",".join(f"{r:g}" for r in d.rates), help="staircase, req/s")
    add("--capacity", type=float, help="skip the search: use this capacity, req/s")
    add("--factor", type=float, default=d.factor, help="overload = factor x capacity")
    add("--duration", type=float, default=d.duration_s, help="seconds per run")
    add("--repeats", type=int, default=d.repeats, help="runs per measurement")
    add("--generators", type=int, default=d.generators, help="generator processes")
    add("--p99-ms", type=float, default=d.p99_ms, help="capacity's p99 bound")
    add(
        "--admissions",
        default=",".join(d.admissions),
        help="settings to compare at overload: " + ", ".join(CONFIGS_BY_ADMISSION),
    )
    args = parser.parse_args(argv)
    if min(args.factor, args.duration, args.repeats, args.generators, args.p99_ms) <= 0:
        parser.error("--factor, --duration, --repeats, --generators and --p99-ms must be positive")
    try:
        rates = tuple(float(r) for r in split_list(args.rates))
    except ValueError:
        parser.error("--rates must be numbers separated by commas")
    return Settings(
        rates, args.capacity, args.factor, args.duration, args.repeats, args.generators,
        args.p99_ms, split_list(args.admissions), args.out,
    )  # fmt: skip


DRIVER = Driver(NAME, parse_args, run, summary, failures=(NoCapacity,))


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
