"""Autoscaling under changing load: the gateway's `r3e` against static peak provisioning, Ray
Serve's rule in the gateway and Ray Serve's own autoscaler, on the same traces.

`python -m loadtest.autoscale` (loadtest/README.md, "Autoscaling under changing load").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loadtest import autoscale_report as ar
from loadtest.experiment import (
    CONFIGS,
    ROOT,
    SCENARIOS,
    Driver,
    Report,
    Run,
    add_common,
    goal_lines,
    goals_doc,
    goals_of,
    header_lines,
    new_parser,
    pct,
    progress,
    settings_doc,
    split_list,
    write_report,
)
from loadtest.measure import CpuReading, cores, delta, drive, harness_report, scrape, slo_attainment

if TYPE_CHECKING:
    from loadtest.runner import GeneratorResult
    from loadtest.scenario import Scenario

NAME = "autoscale"
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
    progress(NAME, line)


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


def parse(doc: dict[str, Any], url: str, data: Path, seed: int) -> Scenario:
    from loadtest.scenario import parse_scenario

    filled = {**doc, "target": {"url": url}, "seed": seed}
    filled["request"] = {**doc.get("request", {}), "data": str(data)}
    return parse_scenario(filled, source=f"<autoscale {doc.get('name')}>", base_dir=ROOT)


# --- systems -----------------------------------------------------------------------------------


@dataclass
class Running:
    """A started system: its URL, pid, how to read its replicas, how to stop it."""

    url: str
    pid: int
    stop: Callable[[], int]
    ray_csv: Path | None = None


def start(system: str, out: Path) -> Running:
    from loadtest.gateway import start_gateway, stop_gateway
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
    while True:
        try:
            samples = await scrape(url, timeout_s=2)
            points.append((time.monotonic() - start_at, ar.gateway_replicas(samples)))
        except (RuntimeError, OSError):
            pass
        await asyncio.sleep(0.5)


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Observed:
    """What one measured run of a system left behind, for its row."""

    sc: Scenario
    result: GeneratorResult
    points: list[ar.ReplicaPoint]
    counters: dict[str, Any]
    cpu: dict[str, float]
    started: dt.datetime
    url: str
    exit_code: int = 0


async def _observe(sysm: Running, sc: Scenario, data: Path, quiet: bool) -> Observed:
    """Run the scenario against the system while recording its replicas and CPU."""
    gateway = sysm.ray_csv is None
    before = await scrape(sysm.url) if gateway else {}
    points: list[ar.ReplicaPoint] = []
    cpu0 = CpuReading.now(sysm.pid)
    started = dt.datetime.now().astimezone()
    # The harness starts sending 0.2 s after execute() is called (loadtest.harness.execute).
    start_at, start_wall = time.monotonic() + 0.2, time.time() + 0.2
    poller = asyncio.ensure_future(poll_gateway(sysm.url, start_at, points)) if gateway else None
    try:
        result, _marks = await drive(sc, sysm.url, data, quiet)
    finally:
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    cpu = cores(cpu0, CpuReading.now(sysm.pid))
    change = delta(before, await scrape(sysm.url)) if gateway else {}
    counters = {
        "replica_seconds": ar.counter_by_tier(change, "ensemble_replica_seconds_total"),
        "spend": ar.counter_by_tier(change, "ensemble_spend_total"),
    }
    if sysm.ray_csv is not None:
        points = ar.ray_replicas(sysm.ray_csv.read_text(), start_wall)
    return Observed(sc, result, points, counters, cpu, started, sysm.url)


async def measure(
    settings: Settings, system: str, scenario: str, out: Path, data: Path
) -> dict[str, Any]:
    """Start the system, warm it up, run the scenario while recording replicas; its row."""
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
        say(f"{scenario}/{system}: measuring {sc.load.duration_s:g} s")
        seen = await _observe(sysm, sc, data, settings.quiet)
    finally:
        code = await asyncio.to_thread(sysm.stop)
    seen.exit_code = code
    harness = harness_report(
        sc, seen.result, run_dir, url=sysm.url, source=f"<autoscale {scenario}>",
        started=seen.started,
    )  # fmt: skip
    row = _row(settings, system, scenario, harness, seen)
    (run_dir / "row.json").write_text(json.dumps(row, indent=1))
    say(
        f"{scenario}/{system}: attainment {pct(row['slo_attainment'])}, p99 "
        f"{row['latency_ms']['p99']} ms, cost {row['cost']:.5f}, peak replicas "
        f"{row['peak_replicas']}, p99 back after {row['recovery_s']} s"
    )
    return row


def _row(
    settings: Settings, system: str, scenario: str, harness: dict[str, Any], seen: Observed
) -> dict[str, Any]:
    from loadtest.shapes import schedule_duration

    duration = schedule_duration(seen.sc.load)
    points = seen.points
    seconds = ar.replica_seconds(points, duration)
    kind = SYSTEMS[system][0]
    priced = ar.ray_priced_seconds(points, duration) if kind == "ray" else seconds
    att, within = slo_attainment(seen.result, settings.slo_ms)
    step = ar.step_of(seen.sc.load)
    timeline = harness["timeline"]
    in_run = [p for p in points if 0 <= p[0] <= duration]
    slo = settings.slo_ms
    return {
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
        "cost": round(ar.cost(priced, settings.prices), 7),
        "prices_per_replica_hour": settings.prices,
        "gateway_counters": seen.counters,
        "first_scale_up_s": "n/a" if step is None else ar.first_scale_up_s(points, step),
        "recovery_s": "n/a" if step is None else ar.recovery_s(timeline, step, slo),
        "recovery_excl_stalls_s": "n/a"
        if step is None
        else ar.recovery_s(timeline, step, slo, skip_stalls=True),
        "stall_seconds": ar.stall_seconds(timeline),
        "step": None if step is None else asdict(step),
        "bad_seconds": ar.bad_seconds(timeline, slo),
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
        "exit_code": seen.exit_code,
        "cores": seen.cpu,
        "send_lag_p99_ms": harness["generator"]["send_lag_ms"]["p99"],
        "warnings": harness["warnings"],
    }


# --- report ------------------------------------------------------------------------------------


def summary(report: Report) -> str:
    return (
        f"{ar.table(report['runs'], report['settings']['slo_ms'])}\n{goal_lines(goals_of(report))}"
    )


def render_markdown(report: Report) -> str:
    s = report["settings"]
    return "\n".join(
        [
            "# Autoscaling under changing load",
            "",
            *header_lines(report),
            f"- SLO {s['slo_ms']:g} ms; prices per replica-hour {report['prices']}",
            "",
            ar.table(report["runs"], s["slo_ms"]),
            "",
            "```",
            goal_lines(goals_of(report)),
            "```",
            "",
        ]
    )


def run(settings: Settings, command: str = "") -> Report:
    """Measure every scenario on every system (or, with --rebuild, write the report of the
    runs already in --out again); report.json, report.md and a PNG per scenario."""
    import uvloop

    from ensemble.models import ensure_zoo

    settings = replace(settings, prices=prices_of(SYSTEMS["r3e"][1]))
    if settings.rebuild and settings.out is not None:
        return rebuild(settings, settings.out)
    this = Run(NAME, settings.out, command)
    zoo = ROOT / "models" / "digits"
    ensure_zoo(zoo, progress=say)
    rows: list[dict[str, Any]] = []

    async def everything() -> None:
        for scenario in settings.scenarios:
            for system in settings.systems:
                rows.append(await measure(settings, system, scenario, this.out, zoo / "test.npz"))

    uvloop.run(everything())
    return _write(settings, rows, this.header())


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
    return f"{table}\n\n```\n{goal_lines(ar.goals(rows))}\n```"


def rebuild(settings: Settings, out: Path) -> Report:
    """The report, table and plots again from the runs' OUT/SCENARIO/SYSTEM/row.json files
    (e.g. of a sweep that was cut short); settings name the SLO."""
    rows = load_rows(out, settings.slo_ms)
    previous = out / "report.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    header = {
        "driver": NAME,
        "command": old.get("command", "n/a (rebuilt from row.json files)"),
        "started_at": old.get("started_at", "n/a"),
        "elapsed_s": float(old.get("elapsed_s", 0.0)),
        "machine": old.get("machine", {}),
        "out": str(out),
    }
    scenarios = tuple(dict.fromkeys(r["scenario"] for r in rows))
    systems = tuple(dict.fromkeys(r["system"] for r in rows))
    return _write(replace(settings, scenarios=scenarios, systems=systems), rows, header)


def _write(settings: Settings, rows: list[dict[str, Any]], header: Report) -> Report:
    """OUT/report.json, OUT/report.md and a PNG per scenario; the report."""
    from loadtest.autoscale_plot import plot

    out = Path(header["out"])
    report: Report = {
        **header,
        "settings": settings_doc(settings, out=str(out)),
        "prices": settings.prices,
        "runs": rows,
        "goals": goals_doc(ar.goals(rows)),
    }
    written = write_report(out, report, render_markdown(report))
    for scenario in settings.scenarios:
        plot(rows, scenario, settings.slo_ms, out / f"{scenario}.png")
    return written


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME, quick=f"smoke: loads {QUICK_SCALE:g}x as long, 2 s warm-up")
    add = parser.add_argument
    add("--systems", default=",".join(SYSTEMS), help="comma-separated")
    add("--scenarios", default=",".join(SCENARIO_NAMES), help="comma-separated")
    add("--slo-ms", type=float, default=250.0, help="latency SLO (default 250)")
    add("--warmup", type=float, default=5.0, help="warm-up seconds (default 5)")
    add(
        "--rebuild",
        action="store_true",
        help="measure nothing: rebuild --out's report and plots from its runs' row.json files",
    )
    add(
        "--median",
        metavar="DIR,DIR,...",
        help="measure nothing: print the median of each measure over these --out directories "
        "(repeats of a sweep) and the goals on the medians",
    )
    args = parser.parse_args(argv)
    if args.rebuild and args.out is None:
        parser.error("--rebuild needs --out DIR")
    systems, scenarios = split_list(args.systems), split_list(args.scenarios)
    for names, known in ((systems, SYSTEMS), (scenarios, SCENARIO_NAMES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)}; known: {', '.join(known)}")
    median = tuple(Path(d) for d in split_list(args.median))
    warmup = min(args.warmup, 2.0) if args.quick else args.warmup
    return Settings(systems, scenarios, args.out, args.slo_ms, warmup, args.quick,
                    args.seed, args.quiet, args.rebuild, median=median)  # fmt: skip


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    if settings.median:
        try:
            print(medians(settings.median, settings.slo_ms))
        except FileNotFoundError as exc:
            say(f"could not read the runs: {exc}")
            return 2
        return 0
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
