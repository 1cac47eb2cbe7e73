"""Goodput under overload: find the gateway's capacity, then offer a multiple of it once per
admission setting and compare goodput (README: "Overload and admission")."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from loadtest.peers import machine_steal_seconds

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CAPACITY_SCENARIO = HERE / "scenarios" / "overload_capacity.yaml"
OVERLOAD_SCENARIO = HERE / "scenarios" / "overload_2x.yaml"
CONFIGS = {
    "default": ROOT / "configs" / "local.yaml",  # the quickstart's admission, whatever it is
    **{name: HERE / "configs" / f"overload_{name}.yaml" for name in ("bounded", "adaptive", "off")},
}


def run(
    scenario: Path, config: Path, rps: float, duration_s: float, generators: int, out: Path
) -> dict[str, Any] | None:
    """One `ensemble loadtest` run of ``scenario`` at ``rps`` against ``config``; its report."""
    doc = yaml.safe_load(scenario.read_text())
    doc["target"] = {"config": str(config)}
    doc["load"] = {"shape": "poisson", "rps": rps, "duration_s": duration_s}
    doc["generators"] = generators
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ensemble = str(ROOT / ".venv" / "bin" / "ensemble")
    command = [ensemble, "loadtest", str(path), "--out", str(out), "--quiet"]
    for _ in range(3):  # a run that could not start (exit 2, no report) is tried again
        started, steal = time.monotonic(), machine_steal_seconds()
        subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        if (out / "report.json").exists():
            report: dict[str, Any] = json.loads((out / "report.json").read_text())
            # Cores the hypervisor took away meanwhile (start-up and drain included).
            report["steal_cores"] = (machine_steal_seconds() - steal) / (time.monotonic() - started)
            return report
    print(f"{path}: no report after 3 attempts (see {out}); run skipped", file=sys.stderr)
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


def median_row(rows: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The run with the median goodput, the lower of the middle two (every run is kept in the
    JSON); runs that could not start are left out."""
    ordered = sorted((r for r in rows if r is not None), key=lambda r: r["goodput_rps"])
    if not ordered:
        raise SystemExit("no run of this measurement could start")
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.overload",
        description="Measure the goodput capacity of configs/local.yaml's ensemble without "
        "admission control (loadtest/configs/overload_off.yaml; open-loop Poisson at --rates; "
        "the highest goodput among rates whose p99 stays within --p99-ms and whose goodput is "
        "at least 90%% of the rate (accuracy is 97%%)), then offer --factor times it once per "
        "admission setting (`default`: configs/local.yaml as shipped; "
        "loadtest/configs/overload_{bounded,adaptive,off}.yaml) and print goodput as a share "
        "of capacity. Every measurement runs --repeats times; the median run is reported.",
    )
    parser.add_argument("--rates", default="400,600,800,1000,1200", help="staircase, req/s")
    parser.add_argument("--capacity", type=float, help="skip the search: use this capacity, req/s")
    parser.add_argument("--factor", type=float, default=2.0, help="overload = factor x capacity")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement")
    parser.add_argument("--generators", type=int, default=3, help="generator processes")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="capacity's p99 bound")
    parser.add_argument(
        "--admissions",
        default="default,bounded,off",
        help="settings to compare at overload: " + ", ".join(CONFIGS),
    )
    parser.add_argument("--out", type=Path, help="results directory")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "loadtest" / "results" / f"overload-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"capacity_runs": {}, "overload_runs": {}}

    capacity = args.capacity
    if capacity is None:
        best = 0.0
        for rps in (float(r) for r in args.rates.split(",")):
            rows = [
                row(run(CAPACITY_SCENARIO, CONFIGS["off"], rps, args.duration,
                        args.generators, out / f"capacity-{rps:g}-{i}"), rps)
                for i in range(args.repeats)
            ]  # fmt: skip
            result["capacity_runs"][f"{rps:g}"] = rows
            med = median_row(rows)
            ok = med["p99_ms"] is not None and med["p99_ms"] <= args.p99_ms
            ok = ok and med["goodput_rps"] >= 0.9 * rps
            print(f"capacity search {rps:g} req/s: {_line(med)} -> {'ok' if ok else 'over'}")
            if ok:  # no early stop: on a shared machine a noisy step may fail below capacity
                best = max(best, med["goodput_rps"])
        capacity = best
    if not capacity:
        print("no rate met the capacity bound; try lower --rates", file=sys.stderr)
        return 1
    result["capacity_rps"] = capacity
    offered = round(args.factor * capacity)
    print(f"capacity {capacity:.0f} req/s; offering {offered} req/s ({args.factor:g}x)")
    table = []
    for name in args.admissions.split(","):
        rows = [
            row(run(OVERLOAD_SCENARIO, CONFIGS[name], offered, args.duration, args.generators,
                    out / f"{name}-{i}"), offered)
            for i in range(args.repeats)
        ]  # fmt: skip
        result["overload_runs"][name] = rows
        med = median_row(rows)
        goodputs = ", ".join(
            f"{r['goodput_rps']:.0f} (steal {_steal(r)})" if r else "failed" for r in rows
        )
        print(f"{name}: {_line(med)} (goodput, steal in cores, of each run: {goodputs})")
        table.append((name, med))
    lines = [
        "| admission | capacity req/s | offered req/s | goodput req/s | goodput / capacity "
        "| p99 of admitted ms | shed % | other errors | send lag p99 ms | generator kept up "
        "| steal (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, med in table:
        other = {k: v for k, v in med["errors"].items() if k != "http_429"}
        lines.append(
            f"| {name} | {capacity:.0f} | {offered} | {med['goodput_rps']:.0f} | "
            f"{100 * med['goodput_rps'] / capacity:.0f} % | {med['p99_ms']} | "
            f"{med['shed_pct']:.1f} | {other or 0} | {med['send_lag_p99_ms']} | "
            f"{'no' if med['generator_saturated'] else 'yes'} | {_steal(med)} |"
        )
    print("\n".join(lines))
    result["table"] = lines
    (out / "overload.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out}", file=sys.stderr)
    return 0


def _steal(r: dict[str, Any]) -> str:
    return "n/a" if r.get("steal_cores") is None else f"{r['steal_cores']:.2f}"


def _line(r: dict[str, Any]) -> str:
    return (
        f"goodput {r['goodput_rps']:.0f} req/s, p99 {r['p99_ms']} ms, shed {r['shed_pct']:.1f} %, "
        f"errors {r['errors']}, send lag p99 {r['send_lag_p99_ms']} ms, steal {_steal(r)} cores"
        f"{' (generator saturated)' if r['generator_saturated'] else ''}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
