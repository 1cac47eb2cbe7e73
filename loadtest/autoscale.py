"""Autoscaling under changing load: the gateway's `r3e` against static peak provisioning, Ray
Serve's rule in the gateway and Ray Serve's own autoscaler, on the same traces.

`python -m loadtest.autoscale` (loadtest/README.md, "Autoscaling under changing load").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from loadtest import autoscale_report as ar

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "loadtest" / "configs"
SCENARIOS = ROOT / "loadtest" / "scenarios"
RESULTS_DIR = ROOT / "loadtest" / "results"
SYSTEMS: dict[str, tuple[str, Path]] = {
    "r3e": ("gateway", CONFIGS / "autoscale.yaml"),
    "r3e_lean": ("gateway", CONFIGS / "autoscale_lean.yaml"),
    "static": ("gateway", CONFIGS / "autoscale_static.yaml"),
    "target_inflight": ("gateway", CONFIGS / "autoscale_inflight.yaml"),
    "ray": ("ray", CONFIGS / "autoscale.yaml"),
    "ray_tuned": ("ray", CONFIGS / "autoscale.yaml"),
}
"""System name -> (kind, config). Ray peers serve the config's member on the same device."""
SCENARIO_NAMES = ("step", "spike", "diurnal")
QUICK_SCALE = 0.3
"""--quick: every time in a scenario's load times this (the 120 s step becomes 36 s)."""
_TIME_KEYS = ("at_s", "duration_s", "spike_at_s", "spike_duration_s", "period_s")

DESCRIPTION = f"""\
Autoscaling under changing load.

For each scenario (default: {", ".join(SCENARIO_NAMES)}: loadtest/scenarios/autoscale_NAME.yaml)
and each system (default: {", ".join(SYSTEMS)}), on a freshly started system: a --warmup run at
the scenario's first rate, then the scenario itself through the load-test harness (open loop,
Poisson, HTTP binary tensors, one generator in this process), its target set to the system.
Systems: r3e, r3e_lean, static and target_inflight are `ensemble serve` on loadtest/configs/
autoscale.yaml, autoscale_lean.yaml (r3e sized for cost), autoscale_static.yaml (edge 3 + cloud
2, fixed) and autoscale_inflight.yaml; ray and ray_tuned
are `python -m loadtest.peers.ray_autoscale_app` (Ray Serve's autoscaler, Ray's defaults or
upscale_delay_s 1 / downscale_delay_s 10). Every replica is the same emulated device (one call
at a time, >= 50 ms). While the load runs, replicas per tier are scraped every 0.5 s (gateway:
/metrics; Ray: the peer's serve.status() log).
Per run: SLO attainment (share of sent requests answered within --slo-ms), p99, replica-seconds
per tier and their cost (tier price per replica-hour; Ray's first {ar.EDGE_SLOTS} replicas at the
edge price, the rest at the cloud price), first scale-up after the step, seconds until the
per-second p99 is back under the SLO for good. Goals: p99 back under the SLO within
{ar.GOAL_REACT_S:g} s of the step; >= {100 * ar.GOAL_COST_CUT:g}% cheaper than static peak at the
same attainment (within {100 * ar.SAME_ATTAINMENT:g} point). Writes OUT/report.json, OUT/report.md,
OUT/SCENARIO.png and each run's harness report under OUT/SCENARIO/SYSTEM/. Exit 0 when the runs
completed (whatever the goals say), 2 when they could not.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    systems: tuple[str, ...] = tuple(SYSTEMS)
    scenarios: tuple[str, ...] = SCENARIO_NAMES
    out: Path | None = None
    slo_ms: float = 250.0
    warmup_s: float = 5.0
    quick: bool = False
    seed: int = 0
    quiet: bool = False
    rebuild: bool = False
    prices: dict[str, float] = field(default_factory=dict)
    """Per tier, price per replica-hour (read from the r3e config when the run starts)."""
    median: tuple[Path, ...] = ()
    """--median: summarise these --out directories instead of measuring."""


def say(line: str) -> None:
    print(f"autoscale: {line}", file=sys.stderr, flush=True)


def prices_of(config: Path) -> dict[str, float]:
    from ensemble.config import load_config

    return {name: t.cost_per_replica_hour for name, t in load_config(config).tiers.items()}


def scenario_doc(name: str, quick: bool) -> dict[str, Any]:
    """The scenario file's document, its load's times scaled down for --quick."""
    doc: dict[str, Any] = yaml.safe_load((SCENARIOS / f"autoscale_{name}.yaml").read_text())
    if quick:
        load = doc["load"]
        for key in _TIME_KEYS:
            if key in load:
                load[key] = round(load[key] * QUICK_SCALE, 3)
        for step in load.get("steps", []):
            step["at_s"] = round(step["at_s"] * QUICK_SCALE, 3)
        doc["name"] = f"{doc.get('name', name)}_quick"
    return doc


def first_rate(load: dict[str, Any]) -> float:
    if "steps" in load:
        return float(load["steps"][0]["rps"])
    if "base_rps" in load:
        return float(load["base_rps"])
    if "mean_rps" in load:
        return float(load["mean_rps"] - load["amplitude_rps"])
    return float(load.get("rps", 10))


def parse(doc: dict[str, Any], url: str, data: Path, seed: int) -> Any:
    from loadtest.scenario import parse_scenario

    filled = {**doc, "target": {"url": url}, "seed": seed}
    filled["request"] = {**doc.get("request", {}), "data": str(data)}
    return parse_scenario(filled, source=f"<autoscale {doc.get('name')}>", base_dir=ROOT)


async def drive(sc: Any, url: str, data: Path, quiet: bool) -> Any:
    """One scenario's load through the harness; its GeneratorResult."""
    from loadtest.cli import execute
    from loadtest.fleet import Job
    from loadtest.shapes import schedule_duration

    result, _marks, interrupted = await execute(
        Job(sc, url, None, data, None), None, schedule_duration(sc.load), quiet
    )
    if interrupted:
        raise KeyboardInterrupt
    return result


# --- systems -----------------------------------------------------------------------------------


@dataclass
class Running:
    """A started system: its URL, pid, how to read its replicas, how to stop it."""

    url: str
    pid: int
    stop: Callable[[], int]
    ray_csv: Path | None = None


def start(system: str, out: Path) -> Running:
    from loadtest.cli import start_gateway, stop_gateway
    from loadtest.peers import free_port, spawn

    kind, config = SYSTEMS[system]
    if kind == "gateway":
        gw = start_gateway(config, out / "gateway.log", 120)
        return Running(gw.url, gw.proc.pid, lambda: stop_gateway(gw, 60))
    csv = out / "ray_replicas.csv"
    args = ["-m", "loadtest.peers.ray_autoscale_app", str(config), "--port", str(free_port())]
    args += ["--replicas-csv", str(csv)] + (["--tuned"] if system == "ray_tuned" else [])
    env = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    peer = spawn("ray", args, out, env).wait_ready(240)
    host, port = peer.http
    return Running(f"http://{host}:{port}", peer.proc.pid, lambda: peer.stop(90), csv)


async def poll_gateway(url: str, start_at: float, points: list[ar.ReplicaPoint]) -> None:
    """Replicas per tier every 0.5 s until cancelled (a failed scrape is a gap)."""
    from loadtest.straggler import scrape

    while True:
        try:
            samples = await scrape(url, timeout_s=2)
            points.append((time.monotonic() - start_at, ar.gateway_replicas(samples)))
        except (RuntimeError, OSError):
            pass
        await asyncio.sleep(0.5)


# --- one run -----------------------------------------------------------------------------------


async def measure(
    settings: Settings, system: str, scenario: str, out: Path, data: Path
) -> dict[str, Any]:
    """Start the system, warm it up, run the scenario while recording replicas; its row."""
    from loadtest.fleet import cpu_seconds
    from loadtest.peers import machine_busy_seconds, machine_steal_seconds, tree_cpu_seconds
    from loadtest.report import RunInfo, build_report, write_report
    from loadtest.straggler import scrape, slo_attainment

    run_dir = out / scenario / system
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = scenario_doc(scenario, settings.quick)
    say(f"{scenario}/{system}: starting")
    sysm = await asyncio.to_thread(start, system, run_dir)
    try:
        if settings.warmup_s > 0:
            warm = {**doc, "name": f"{doc['name']}_warmup", "slo": {}, "load": {
                "shape": "poisson", "rps": first_rate(doc["load"]), "duration_s": settings.warmup_s
            }}  # fmt: skip
            await drive(parse(warm, sysm.url, data, settings.seed + 1), sysm.url, data, True)
        sc = parse(doc, sysm.url, data, settings.seed)
        kind = SYSTEMS[system][0]
        before = await scrape(sysm.url) if kind == "gateway" else {}
        points: list[ar.ReplicaPoint] = []
        busy0, own0, sys0 = machine_busy_seconds(), cpu_seconds(), tree_cpu_seconds(sysm.pid)
        steal0 = machine_steal_seconds()
        # The harness starts sending 0.2 s after execute() is called (loadtest.cli.execute).
        start_at, start_wall = time.monotonic() + 0.2, time.time() + 0.2
        wall0 = time.monotonic()
        poller = (
            asyncio.ensure_future(poll_gateway(sysm.url, start_at, points))
            if kind == "gateway"
            else None
        )
        say(f"{scenario}/{system}: measuring {sc.load.duration_s:g} s")
        try:
            result = await drive(sc, sysm.url, data, settings.quiet)
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
        wall = time.monotonic() - wall0
        cpu_sys = tree_cpu_seconds(sysm.pid) - sys0
        own = cpu_seconds() - own0
        # busy includes steal (the hypervisor's), which is host noise but no process here
        steal = (machine_steal_seconds() - steal0) / wall
        others = max(0.0, machine_busy_seconds() - busy0 - cpu_sys - own) / wall - steal
        others = max(0.0, others)
        after = await scrape(sysm.url) if kind == "gateway" else {}
    finally:
        code = await asyncio.to_thread(sysm.stop)
    if sysm.ray_csv is not None:
        points = ar.ray_replicas(sysm.ray_csv.read_text(), start_wall)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = RunInfo(sc.name, f"<autoscale {scenario}>", started, sysm.url, None, False, None, [])
    harness = build_report(sc, result, info)
    write_report(harness, run_dir)
    duration = float(sc.load.duration_s)
    prices = settings.prices
    seconds = ar.replica_seconds(points, duration)
    priced = ar.ray_priced_seconds(points, duration) if kind == "ray" else seconds
    att, within = slo_attainment(result, settings.slo_ms)
    step = ar.step_of(sc.load)
    timeline = harness["timeline"]
    in_run = [p for p in points if 0 <= p[0] <= duration]
    row: dict[str, Any] = {
        "scenario": scenario,
        "system": system,
        "sent": harness["requests"]["sent"],
        "answered": harness["requests"]["answered"],
        "errors": sum(harness["errors"].values()),
        "errors_by_kind": harness["errors"],
        "within_slo": within,
        "slo_attainment": None if att is None else round(att, 5),
        "latency_ms": harness["latency_ms"],
        "replica_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "replica_seconds_priced": {k: round(v, 2) for k, v in priced.items()},
        "cost": round(ar.cost(priced, prices), 7),
        "prices_per_replica_hour": prices,
        "gateway_counters": {
            "replica_seconds": ar.counter_by_tier(
                _delta(before, after), "ensemble_replica_seconds_total"
            ),
            "spend": ar.counter_by_tier(_delta(before, after), "ensemble_spend_total"),
        },
        "first_scale_up_s": "n/a" if step is None else ar.first_scale_up_s(points, step),
        "recovery_s": "n/a" if step is None else ar.recovery_s(timeline, step, settings.slo_ms),
        "recovery_excl_stalls_s": "n/a"
        if step is None
        else ar.recovery_s(timeline, step, settings.slo_ms, skip_stalls=True),
        "stall_seconds": ar.stall_seconds(timeline),
        "step": None if step is None else asdict(step),
        "bad_seconds": ar.bad_seconds(timeline, settings.slo_ms),
        "peak_replicas": max((ar.total(x) for _, x in in_run), default=None),
        "replicas": [[round(t, 2), x] for t, x in points],
        "timeline": [
            {
                "t": r["t"],
                "sent": r["sent"],
                "answered": r["answered"],
                "errors": r["errors"],
                "p99_ms": r["latency_ms"]["p99"],
                "lag_p99_ms": r["lag_p99_ms"],
            }
            for r in timeline
        ],
        "exit_code": code,
        "cores": {
            "system": round(cpu_sys / wall, 3),
            "generator": round(own / wall, 3),
            "others": round(others, 3),
            "steal": round(steal, 3),
        },
        "send_lag_p99_ms": harness["generator"]["send_lag_ms"]["p99"],
        "warnings": harness["warnings"],
    }
    (run_dir / "row.json").write_text(json.dumps(row, indent=1))
    say(
        f"{scenario}/{system}: attainment {_pct(row['slo_attainment'])}, p99 "
        f"{row['latency_ms']['p99']} ms, cost {row['cost']:.5f}, peak replicas "
        f"{row['peak_replicas']}, p99 back after {row['recovery_s']} s"
    )
    return row


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.2f}%"


# --- report ------------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], scenario: str, slo_ms: float, path: Path) -> None:
    """Stacked panels on one time axis: offered and answered rate, per-second p99 with the SLO,
    replicas (total), and replicas beyond the edge (gateway: cloud; Ray: beyond 3)."""
    import matplotlib.pyplot as plt

    import loadtest.plots  # noqa: F401 - selects the Agg backend before pyplot draws

    mine = [r for r in rows if r["scenario"] == scenario]
    if not mine:
        return
    fig, axes = plt.subplots(4, 1, figsize=(9.0, 10.0), sharex=True)
    rate, p99, reps, cloud = axes
    first = mine[0]["timeline"]
    rate.plot([r["t"] + 0.5 for r in first], [r["sent"] for r in first], color="black",
              linewidth=1.6, drawstyle="steps-mid", label="offered")  # fmt: skip
    for r in mine:
        t = [x["t"] + 0.5 for x in r["timeline"]]
        rate.plot(t, [x["answered"] for x in r["timeline"]], linewidth=1, drawstyle="steps-mid",
                  label=f"answered: {r['system']}")  # fmt: skip
        p99.plot(t, [x["p99_ms"] if x["p99_ms"] is not None else float("nan")
                     for x in r["timeline"]], linewidth=1, label=r["system"])  # fmt: skip
        pt = [p[0] for p in r["replicas"]]
        reps.plot(pt, [sum(p[1].values()) for p in r["replicas"]], drawstyle="steps-post",
                  linewidth=1.2, label=r["system"])  # fmt: skip
        beyond = [
            p[1].get("cloud", 0) if "ray" not in p[1] else max(0, p[1]["ray"] - ar.EDGE_SLOTS)
            for p in r["replicas"]
        ]
        cloud.plot(pt, beyond, drawstyle="steps-post", linewidth=1.2, label=r["system"])
    p99.axhline(slo_ms, color="tab:red", linestyle="--", linewidth=0.8, label=f"SLO {slo_ms:g}")
    p99.set_yscale("log")
    labels = (
        "requests / s",
        "p99 per second (ms)",
        "replicas (all)",
        "cloud replicas\n(Ray: beyond 3)",
    )
    for ax, label in zip(axes, labels, strict=True):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    rate.set_title(f"autoscale {scenario}: rate, p99, replicas")
    cloud.set_xlabel("time since start (s)")
    end = max(float(r["timeline"][-1]["t"] + 1) for r in mine if r["timeline"])
    cloud.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdicts(report: dict[str, Any]) -> str:
    g = report["goals"]
    lines = [f"goal 1: p99 back under the SLO within {ar.GOAL_REACT_S:g} s of the step"]
    for x in g["react"]:
        rec = "never" if x["recovery_s"] is None else f"{x['recovery_s']:g} s"
        line = f"  {x['scenario']}/{x['system']}: {rec}: {'met' if x['met'] else 'NOT met'}"
        quiet = x.get("recovery_excl_stalls_s", x["recovery_s"])
        if quiet != x["recovery_s"]:
            shown = "never" if quiet is None else f"{quiet:g} s"
            verdict = "met" if x["met_excl_stalls"] else "NOT met"
            line += f"; host stalls left out: {shown}: {verdict}"
        lines.append(line)
    lines.append(
        f"goal 2: >= {100 * ar.GOAL_COST_CUT:g}% cheaper than static peak at the same attainment"
    )
    for x in g["cost"]:
        lines.append(
            f"  {x['scenario']}/{x['system']}: {100 * x['cost_share_of_static']:.0f}% of its cost, "
            f"attainment {x['attainment_vs_static_points']:+.2f} points: "
            f"{'met' if x['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    return "\n".join(
        [
            "# Autoscaling under changing load",
            "",
            f"- command: `{report['command']}`",
            f"- machine: {m['cpus']} CPUs, {m['platform']}; load average before {m['loadavg']}",
            f"- started {report['started_at']}, took {report['elapsed_s']:.0f} s; SLO "
            f"{s['slo_ms']:g} ms; prices per replica-hour {report['prices']}",
            "",
            ar.table(report["runs"], s["slo_ms"]),
            "",
            "```",
            verdicts(report),
            "```",
            "",
        ]
    )


def run(settings: Settings, command: str = "") -> dict[str, Any]:
    import uvloop

    from ensemble.models import ensure_zoo

    settings = replace(settings, prices=prices_of(SYSTEMS["r3e"][1]))
    started = dt.datetime.now().astimezone()
    out = settings.out or RESULTS_DIR / f"autoscale-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    zoo = ROOT / "models" / "digits"
    ensure_zoo(zoo, progress=say)
    data = zoo / "test.npz"
    loadavg = [round(x, 2) for x in os.getloadavg()]
    clock = time.monotonic()
    rows: list[dict[str, Any]] = []

    async def everything() -> None:
        for scenario in settings.scenarios:
            for system in settings.systems:
                rows.append(await measure(settings, system, scenario, out, data))

    uvloop.run(everything())
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": loadavg}
    meta = {
        "command": command or "python -m loadtest.autoscale",
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "machine": machine,
    }
    return write_report(settings, out, rows, meta)


def load_rows(out: Path, slo_ms: float = 250.0) -> list[dict[str, Any]]:
    """Every run's row under OUT/SCENARIO/SYSTEM/row.json. A row written before host stalls
    were counted gets them from its run's harness report (report.json, same directory)."""
    rows = []
    for scenario in SCENARIO_NAMES:
        for system in SYSTEMS:
            path = out / scenario / system / "row.json"
            if not path.is_file():
                continue
            row = json.loads(path.read_text())
            harness = path.parent / "report.json"
            if "stall_seconds" not in row and harness.is_file():
                timeline = json.loads(harness.read_text())["timeline"]
                step = row.get("step")
                row["stall_seconds"] = ar.stall_seconds(timeline)
                row["recovery_excl_stalls_s"] = (
                    "n/a"
                    if step is None
                    else ar.recovery_s(timeline, ar.Step(**step), slo_ms, skip_stalls=True)
                )
            rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no SCENARIO/SYSTEM/row.json under {out}")
    return rows


def medians(dirs: Sequence[Path], slo_ms: float) -> str:
    """The median table and the goals on medians over the runs in ``dirs`` (repeats of the same
    sweep, each an --out directory)."""
    rows = ar.median_rows([load_rows(d, slo_ms) for d in dirs])
    table = ar.median_table(rows, slo_ms)
    return f"{table}\n\n```\n{verdicts({'goals': ar.goals(rows)})}\n```"


def rebuild(settings: Settings, out: Path) -> dict[str, Any]:
    """The report, table and plots again from the runs' OUT/SCENARIO/SYSTEM/row.json files
    (e.g. of a sweep that was cut short); settings name the SLO."""
    settings = replace(settings, prices=prices_of(SYSTEMS["r3e"][1]))
    rows = load_rows(out, settings.slo_ms)
    previous = out / "report.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": "n/a"}
    meta = {
        "command": old.get("command", "n/a (rebuilt from row.json files)"),
        "started_at": old.get("started_at", "n/a"),
        "elapsed_s": float(old.get("elapsed_s", 0.0)),
        "machine": old.get("machine", machine),
    }
    scenarios = tuple(dict.fromkeys(r["scenario"] for r in rows))
    systems = tuple(dict.fromkeys(r["system"] for r in rows))
    return write_report(replace(settings, scenarios=scenarios, systems=systems), out, rows, meta)


def write_report(
    settings: Settings, out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """OUT/report.json, OUT/report.md and a PNG per scenario; the report."""
    report: dict[str, Any] = {
        **meta,
        "settings": {**asdict(settings), "out": str(out)},
        "prices": settings.prices,
        "runs": rows,
        "goals": ar.goals(rows),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_markdown(report))
    for scenario in settings.scenarios:
        plot(rows, scenario, settings.slo_ms, out / f"{scenario}.png")
    return report


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.autoscale",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES), help="comma-separated")
    parser.add_argument("--out", type=Path, help="default loadtest/results/autoscale-STAMP/")
    parser.add_argument("--slo-ms", type=float, default=250.0, help="latency SLO (default 250)")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke: loads {QUICK_SCALE:g}x as long, 2 s warm-up"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="measure nothing: rebuild --out's report and plots from its runs' row.json files",
    )
    parser.add_argument(
        "--median",
        metavar="DIR,DIR,...",
        help="measure nothing: print the median of each measure over these --out directories "
        "(repeats of a sweep) and the goals on the medians",
    )
    args = parser.parse_args(argv)
    if args.rebuild and args.out is None:
        parser.error("--rebuild needs --out DIR")
    systems = tuple(s for s in args.systems.split(",") if s)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for name, known in ((systems, SYSTEMS), (scenarios, SCENARIO_NAMES)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)}; known: {', '.join(known)}")
    median = tuple(Path(d) for d in (args.median or "").split(",") if d)
    settings = Settings(systems, scenarios, args.out, args.slo_ms, args.warmup, args.quick,
                        args.seed, args.quiet, args.rebuild, median=median)  # fmt: skip
    return replace(settings, warmup_s=min(settings.warmup_s, 2.0)) if args.quick else settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = "python -m loadtest.autoscale " + " ".join(sys.argv[1:] if argv is None else argv)
    if settings.median:
        try:
            print(medians(settings.median, settings.slo_ms))
        except FileNotFoundError as exc:
            say(f"could not read the runs: {exc}")
            return 2
        return 0
    try:
        if settings.rebuild and settings.out is not None:
            report = rebuild(settings, settings.out)
        else:
            report = run(settings, command.strip())
    except Exception as exc:  # report why the runs could not complete
        say(f"could not run: {type(exc).__name__}: {exc}")
        return 2
    print(ar.table(report["runs"], settings.slo_ms))
    print(verdicts(report))
    say(f"report: {report['settings']['out']}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
