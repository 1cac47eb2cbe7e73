"""Policy profiles under a straggler replica: SLO attainment, accuracy, cost, tail, hedges.

`python -m loadtest.straggler` serves `loadtest/configs/straggler.yaml` once and runs one open-loop
scenario per policy profile through the load-test harness, sequentially on the same gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "loadtest" / "configs" / "straggler.yaml"
RESULTS_DIR = ROOT / "loadtest" / "results"
REFERENCE = "all"
"""The all-members profile the cost and accuracy goal compares against."""
NOHEDGE = "_nohedge"
"""`X_nohedge` is profile X without hedging; the hedging goal compares the two."""

# The issue's goals.
GOAL_ATTAINMENT = 0.99
GOAL_ACCURACY_POINTS = 0.5
GOAL_COST_SHARE = 0.5
GOAL_P99_CUT = 5.0
GOAL_EXTRA_CALLS_PCT = 5.0
BUSY_CORES = 0.2
"""Warn when other processes used more than this many cores during a measured run."""

DESCRIPTION = """\
Policy profiles under a straggler replica.

Serves CONFIG (default loadtest/configs/straggler.yaml: the seven digits members with two
replicas each, one replica of `forest` answering 10% of its calls 100 ms late) once, on free
ports, and runs every policy profile of the config in turn (or those given with --profiles):
a warm-up, then a measured open-loop Poisson run at --rps for --duration seconds through the
load-test harness (HTTP, binary tensors, one generator in this process). Every request carries
parameters {policy: PROFILE, timeout: DEADLINE}; the true label of every answer is posted to the
gateway's feedback API (with ENSEMBLE_FEEDBACK_TOKEN, or a token made for the run when it is
unset), so learning profiles (exp4, cocktail) learn during their warm-up and run.
Every measured run uses the same seed (same arrival times, same samples), so profiles are
compared on identical traffic. /metrics is scraped before and after each measured run for the
profile's member calls, hedges and cost. The defaults (8 profiles, 5 s + 30 s each at 100 req/s)
take about 5 minutes; --quick about 1 minute.

Per profile: SLO attainment (share of sent requests answered successfully within --slo-ms),
accuracy (correct / answered samples), cost per 1,000 requests (ensemble_cost_total when the
gateway exports it, else member calls, hedges and retries priced at their tier's
cost_per_request),
p50/p99 latency (from each request's intended send time), hedges sent and extra calls (hedges /
member calls). Writes OUT/report.json, OUT/report.md and each run's harness report under
OUT/profiles/, prints the table and whether the two goals are met:
  1. some profile reaches >= 99% SLO attainment with accuracy within 0.5 points of `all` (at
     most 0.5 below it) at <= 50% of its cost;
  2. hedging cuts p99 by >= 5x for <= 5% extra calls (each X against X_nohedge).
Exit 0 when the runs completed (whatever the goals say), 2 when they could not run.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    config: Path = DEFAULT_CONFIG
    out: Path | None = None
    rps: float = 100.0
    duration_s: float = 30.0
    warmup_s: float = 5.0
    slo_ms: float = 25.0
    deadline_ms: float = 250.0
    feedback_share: float = 1.0
    profiles: tuple[str, ...] = ()
    """Profiles to run, in order; empty: every profile of the config, in its order."""
    seed: int = 0
    quiet: bool = False


def say(line: str) -> None:
    print(f"straggler: {line}", file=sys.stderr, flush=True)


# --- the gateway's /metrics --------------------------------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...]]
"""A Prometheus sample's name and sorted labels."""


async def scrape(url: str, timeout_s: float = 10.0) -> dict[Sample, float]:
    """Every sample of the gateway's /metrics, by name and labels (with the harness's client)."""
    from prometheus_client.parser import text_string_to_metric_families

    from loadtest.httpclient import HttpPool, encode_request

    hostport = url.removeprefix("http://")
    host, _, port = hostport.rpartition(":")
    pool = HttpPool(host.strip("[]"), int(port), 1, timeout_s)
    got: asyncio.Future[tuple[int, bytes, str | None]] = asyncio.get_running_loop().create_future()
    pool.send(
        encode_request("GET", hostport, "/metrics"),
        lambda status, _h, body, err: got.set_result((status, body, err)),
    )
    try:
        status, body, err = await got
    finally:
        await pool.close()
    if err is not None or status != 200:
        raise RuntimeError(f"GET {url}/metrics: {err or f'HTTP {status}'}")
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """Counter increases between two scrapes (samples that did not move are left out)."""
    out = {}
    for key, value in after.items():
        change = value - before.get(key, 0.0)
        if change:
            out[key] = change
    return out


def _named(samples: dict[Sample, float], name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == name]


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


def gateway_counts(change: dict[Sample, float], prices: Prices) -> dict[str, Any]:
    """A profile's member calls, hedges and cost from the /metrics deltas of its run."""
    calls: dict[str, dict[str, dict[str, int]]] = {}
    priced = 0.0
    for labels, value in _named(change, "ensemble_member_calls_total"):
        member, tier, outcome = labels["member"], labels["tier"], labels["outcome"]
        calls.setdefault(member, {}).setdefault(tier, {})[outcome] = int(value)
        priced += value * prices.tier.get(tier, 0.0)
    hedges: dict[str, dict[str, int]] = {}
    for labels, value in _named(change, "ensemble_hedges_total"):
        hedges.setdefault(labels["member"], {})[labels["outcome"]] = int(value)
        if labels["outcome"] == "sent":
            priced += value * prices.hedge.get(labels["member"], 0.0)
    retries: dict[str, int] = {}
    for labels, value in _named(change, "ensemble_retries_total"):
        retries[labels["member"]] = int(value)
        priced += value * prices.hedge.get(labels["member"], 0.0)
    exported = [
        v
        for labels, v in _named(change, "ensemble_cost_total")
        if prices.model in (labels.get("ensemble"), labels.get("model"))
    ]
    asked = sum(v for _, v in _named(change, "ensemble_members_asked_total"))
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


def learned_weights(samples: dict[Sample, float], profile: str) -> dict[str, float]:
    """Member weights a profile learned (Exp4's), as the gateway exports them."""
    return {
        labels["member"]: round(v, 4)
        for labels, v in _named(samples, "ensemble_selection_weight")
        if labels.get("profile") == profile
    }


# --- one profile -------------------------------------------------------------------------------


def scenario_for(
    settings: Settings, profile: str, url: str, data: Path, model: str, duration_s: float, seed: int
) -> Any:
    """The harness scenario of one run, validated like any scenario file."""
    from loadtest.scenario import parse_scenario

    doc = {
        "name": f"straggler-{profile}",
        "description": f"Profile {profile} under a straggler replica.",
        "target": {"url": url},
        "protocol": "http_binary",
        "model": model,
        "request": {"data": str(data), "timeout_s": max(2.0, 4 * settings.deadline_ms / 1000)},
        "load": {"shape": "poisson", "rps": settings.rps, "duration_s": duration_s},
        "mix": [
            {
                "name": profile,
                "parameters": {"policy": profile, "timeout": round(settings.deadline_ms * 1000)},
            }
        ],
        "slo": {"latency_ms": {"p99": settings.slo_ms}},
        "feedback": {"share": settings.feedback_share},
        "seed": seed,
    }
    return parse_scenario(doc, source=f"<straggler {profile}>", base_dir=ROOT)


async def drive(settings: Settings, sc: Any, url: str, data: Path) -> Any:
    """Run one scenario's load through the harness; returns its GeneratorResult."""
    from loadtest.cli import execute
    from loadtest.fleet import Job
    from loadtest.shapes import schedule_duration

    job = Job(sc, url, None, data, None)
    result, _marks, interrupted = await execute(
        job, None, schedule_duration(sc.load), settings.quiet
    )
    if interrupted:
        raise KeyboardInterrupt
    return result


def slo_attainment(result: Any, slo_ms: float) -> tuple[float | None, int]:
    """Share of sent requests answered successfully within the SLO, and that count."""
    from loadtest.runner import OK

    rec = result.records
    sent = len(rec)
    if not sent:
        return None, 0
    kind = np.frombuffer(rec.kind, dtype=np.int8)
    latency = np.frombuffer(rec.latency, dtype=np.float64)
    within = int(((kind == rec.kinds.index(OK)) & (latency * 1000 <= slo_ms)).sum())
    return within / sent, within


async def run_profile(
    settings: Settings,
    profile: str,
    index: int,
    url: str,
    data: Path,
    prices: Prices,
    out: Path,
    gateway_pid: int | None,
) -> dict[str, Any]:
    """Warm up, then measure one profile; returns its row of the report."""
    from loadtest.report import RunInfo, build_report, write_report

    if settings.warmup_s > 0:
        seed = settings.seed + 1 + index
        warm = scenario_for(settings, profile, url, data, prices.model, settings.warmup_s, seed)
        say(f"{profile}: warm-up {settings.warmup_s:g} s")
        await drive(settings, warm, url, data)
    # Every profile's measured run has the same seed, so the same arrival times and the same
    # samples: differences in accuracy are the profiles', not sampling noise.
    sc = scenario_for(
        settings, profile, url, data, prices.model, settings.duration_s, settings.seed
    )
    say(f"{profile}: measuring {settings.duration_s:g} s at {settings.rps:g} req/s")
    before = await scrape(url)
    cpu_before = _cpu(gateway_pid)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    result = await drive(settings, sc, url, data)
    cpu = [b - a for a, b in zip(cpu_before, _cpu(gateway_pid), strict=True)]
    after = await scrape(url)
    info = RunInfo(sc.name, f"<straggler {profile}>", started, url, None, False, None, [])
    harness = build_report(sc, result, info)
    write_report(harness, out / "profiles" / profile)
    counts = gateway_counts(delta(before, after), prices)
    sent = harness["requests"]["sent"]
    attainment, within = slo_attainment(result, settings.slo_ms)
    calls = counts["calls"]
    wall, gateway_cpu, own_cpu, busy = cpu
    # What the rest of the machine used meanwhile: other users of these cores skew the numbers.
    others = max(0.0, busy - gateway_cpu - own_cpu) / wall
    return {
        "profile": profile,
        "sent": sent,
        "answered": harness["requests"]["answered"],
        "errors": harness["errors"],
        "within_slo": within,
        "slo_attainment": None if attainment is None else round(attainment, 6),
        "accuracy": harness["accuracy"],
        "latency_ms": harness["latency_ms"],
        "cost": counts["cost"],
        "cost_per_1k": round(1000 * counts["cost"] / sent, 6) if sent else None,
        "cost_source": counts["cost_source"],
        "cost_from_calls": counts["cost_from_calls"],
        "calls": calls,
        "calls_per_request": round(calls / sent, 4) if sent else None,
        "members_asked_per_request": round(counts["members_asked"] / sent, 4) if sent else None,
        "hedges_sent": counts["hedges_sent"],
        "hedges_won": counts["hedges_won"],
        "retries": counts["retries"],
        "extra_calls_pct": round(100 * counts["hedges_sent"] / calls, 3) if calls else None,
        "member_calls": counts["member_calls"],
        "hedges": counts["hedges"],
        "learned_weights": learned_weights(after, profile),
        "feedback": harness["feedback"],
        "gateway_cpu_ms_per_request": round(1000 * gateway_cpu / sent, 3) if sent else None,
        "gateway_cores": round(gateway_cpu / wall, 3),
        "generator_cores": round(own_cpu / wall, 3),
        "other_cores": round(others, 3),
        "generator": {
            "send_lag_ms": harness["generator"]["send_lag_ms"],
            "cpu_percent": harness["generator"]["cpu_percent"],
            "saturated": harness["generator"]["generator_saturated"],
        },
        "warnings": harness["warnings"],
    }


def _cpu(gateway_pid: int | None) -> tuple[float, float, float, float]:
    """Wall clock, the gateway's CPU, this process's CPU and the machine's busy CPU, seconds."""
    from loadtest.fleet import cpu_seconds
    from loadtest.peers import machine_busy_seconds, tree_cpu_seconds

    gateway = tree_cpu_seconds(gateway_pid) if gateway_pid is not None else 0.0
    return time.monotonic(), gateway, cpu_seconds(), machine_busy_seconds()


# --- goals -------------------------------------------------------------------------------------


def goals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both goals of the issue, computed from the rows (never assumed)."""
    by_name = {r["profile"]: r for r in rows}
    ref = by_name.get(REFERENCE)
    first: dict[str, Any] = {"reference": REFERENCE, "met": False, "profiles": []}
    if ref is not None and ref["accuracy"] is not None and ref["cost_per_1k"]:
        for r in rows:
            if r["profile"] == REFERENCE or r["slo_attainment"] is None or r["accuracy"] is None:
                continue
            # Within 0.5 points: at most 0.5 below the reference (more accurate is fine).
            points = 100 * (r["accuracy"] - ref["accuracy"])
            share = r["cost_per_1k"] / ref["cost_per_1k"]
            ok = (
                r["slo_attainment"] >= GOAL_ATTAINMENT
                and points >= -GOAL_ACCURACY_POINTS
                and share <= GOAL_COST_SHARE
            )
            first["profiles"].append(
                {
                    "profile": r["profile"],
                    "slo_attainment": r["slo_attainment"],
                    "accuracy_points_vs_reference": round(points, 3),
                    "cost_share_of_reference": round(share, 4),
                    "met": ok,
                }
            )
        first["met"] = any(p["met"] for p in first["profiles"])
    second: dict[str, Any] = {"met": False, "pairs": []}
    for r in rows:
        twin = by_name.get(r["profile"] + NOHEDGE)
        if twin is None:
            continue
        hedged, plain = r["latency_ms"]["p99"], twin["latency_ms"]["p99"]
        cut = plain / hedged if hedged and plain else None
        extra = r["extra_calls_pct"]
        second["pairs"].append(
            {
                "hedged": r["profile"],
                "unhedged": twin["profile"],
                "p99_ms_unhedged": plain,
                "p99_ms_hedged": hedged,
                "p99_cut": None if cut is None else round(cut, 3),
                "extra_calls_pct": extra,
                "met": cut is not None
                and cut >= GOAL_P99_CUT
                and extra is not None
                and extra <= GOAL_EXTRA_CALLS_PCT,
            }
        )
    second["met"] = bool(second["pairs"]) and all(p["met"] for p in second["pairs"])
    return {"cost_accuracy_slo": first, "hedging": second}


# --- report ------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """The Markdown table of the profiles."""
    slo = report["settings"]["slo_ms"]
    lines = [
        f"| profile | SLO attainment (<= {slo:g} ms) | accuracy | cost / 1,000 req | p50 ms | "
        "p99 ms | hedges sent (extra calls) | member calls / req | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["profiles"]:
        attainment = r["slo_attainment"]
        lines.append(
            f"| {r['profile']} | {_num(None if attainment is None else 100 * attainment, '.2f')} % "
            f"| {_num(r['accuracy'], '.4f')} | {_num(r['cost_per_1k'], '.4f')} "
            f"| {_num(r['latency_ms']['p50'], '.2f')} | {_num(r['latency_ms']['p99'], '.2f')} "
            f"| {r['hedges_sent']} ({_num(r['extra_calls_pct'], '.2f')} %) "
            f"| {_num(r['calls_per_request'], '.2f')} | {sum(r['errors'].values())} |"
        )
    return "\n".join(lines)


def verdicts(report: dict[str, Any]) -> str:
    """One line per goal, with the numbers that decide it."""
    g = report["goals"]
    first = g["cost_accuracy_slo"]
    meeting = [p["profile"] for p in first["profiles"] if p["met"]]
    lines = [
        f"goal 1 (>= {100 * GOAL_ATTAINMENT:g}% SLO attainment, accuracy within "
        f"{GOAL_ACCURACY_POINTS:g} points of `{REFERENCE}`, <= {100 * GOAL_COST_SHARE:g}% of its "
        f"cost): {'MET by ' + ', '.join(meeting) if meeting else 'NOT MET'}"
    ]
    for p in first["profiles"]:
        lines.append(
            f"  {p['profile']}: attainment {100 * p['slo_attainment']:.2f}%, accuracy "
            f"{p['accuracy_points_vs_reference']:+.2f} points vs {first['reference']}, "
            f"{100 * p['cost_share_of_reference']:.1f}% of its cost: "
            f"{'met' if p['met'] else 'not met'}"
        )
    second = g["hedging"]
    lines.append(
        f"goal 2 (hedging cuts p99 >= {GOAL_P99_CUT:g}x for <= {GOAL_EXTRA_CALLS_PCT:g}% extra "
        f"calls, every pair): {'MET' if second['met'] else 'NOT MET'}"
    )
    for p in second["pairs"]:
        lines.append(
            f"  {p['hedged']} vs {p['unhedged']}: p99 {_num(p['p99_ms_unhedged'], '.1f')} -> "
            f"{_num(p['p99_ms_hedged'], '.1f')} ms ({_num(p['p99_cut'], '.2f')}x), "
            f"{_num(p['extra_calls_pct'], '.2f')}% extra calls: "
            f"{'met' if p['met'] else 'not met'}"
        )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# Policy profiles under a straggler replica",
        "",
        f"- command: `{report['command']}`",
        f"- config: `{s['config']}`; straggler: {report['straggler']}",
        f"- load: open-loop Poisson, {s['rps']:g} req/s, {s['warmup_s']:g} s warm-up + "
        f"{s['duration_s']:g} s measured per profile, HTTP binary tensors, one generator "
        "process (the harness's own client); feedback share "
        f"{s['feedback_share']:g}",
        f"- requests carry `timeout` {s['deadline_ms']:g} ms; SLO: answered within "
        f"{s['slo_ms']:g} ms",
        f"- machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average "
        f"before: {m['loadavg_before']}; code: {m['git']}",
        f"- started {report['started_at']}, took {report['elapsed_s']:.0f} s; "
        f"gateway exit code {report['gateway_exit_code']}",
        "",
        table(report),
        "",
        "```",
        verdicts(report),
        "```",
        "",
    ]
    lines += [
        "## Where the time and calls went",
        "",
        "| profile | members asked / req | hedges won | retries | gateway CPU ms / req | cores: "
        "gateway / generator / others | send lag p99 ms | cost from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["profiles"]:
        lines.append(
            f"| {r['profile']} | {_num(r['members_asked_per_request'], '.2f')} "
            f"| {r['hedges_won']} | {r['retries']} "
            f"| {_num(r['gateway_cpu_ms_per_request'], '.2f')} "
            f"| {r['gateway_cores']:.2f} / {r['generator_cores']:.2f} / {r['other_cores']:.2f} "
            f"| {_num(r['generator']['send_lag_ms']['p99'], '.2f')} | {r['cost_source']} |"
        )
    lines.append("")
    warned = [(r["profile"], w) for r in report["profiles"] for w in r["warnings"]]
    busy = [r["profile"] for r in report["profiles"] if r["other_cores"] > BUSY_CORES]
    if busy:
        warned.append(
            (", ".join(busy), f"other processes used more than {BUSY_CORES:g} cores meanwhile")
        )
    if warned:
        lines += ["## Warnings", ""] + [f"- {p}: {w}" for p, w in warned] + [""]
    return "\n".join(lines)


def _git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def _straggler_of(config: Path) -> str:
    from ensemble.config import load_config

    cfg = load_config(config)
    found = [
        f"{m.name}@{p.tier} ({p.replicas.min} replica(s), {100 * p.straggler.probability:g}% "
        f"of calls {p.straggler.delay_ms:g} ms late)"
        for e in cfg.ensembles
        for m in e.members
        for p in m.placement
        if p.straggler is not None
    ]
    return "; ".join(found) or "none"


# --- the whole run -----------------------------------------------------------------------------


def run(settings: Settings, command: str = "") -> dict[str, Any]:
    """Serve the config, measure every profile, write report.json and report.md; the report."""
    import uvloop

    from ensemble.auth import FEEDBACK_TOKEN_ENV
    from ensemble.config import load_config
    from ensemble.models import ensure_zoo
    from loadtest.cli import start_gateway, stop_gateway

    cfg = load_config(settings.config)
    names = list(settings.profiles) or list(cfg.policies)
    unknown = [n for n in names if n not in cfg.policies]
    if unknown:
        raise ValueError(f"profile(s) not in {settings.config}: {', '.join(unknown)}")
    started = dt.datetime.now().astimezone()
    out = settings.out or RESULTS_DIR / f"straggler-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    zoo = cfg.zoo_dir()
    ensure_zoo(zoo, progress=say)
    data = zoo / "test.npz"
    prices = Prices.of(settings.config)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "git": _git_state(),
    }
    say(f"starting the gateway on {settings.config} (log: {out / 'gateway.log'})")
    clock = time.monotonic()
    # Feedback needs the gateway's token: the gateway and the harness share one made for this run.
    os.environ.setdefault(FEEDBACK_TOKEN_ENV, secrets.token_hex(16))
    gw = start_gateway(settings.config, out / "gateway.log", 120)
    rows: list[dict[str, Any]] = []
    try:

        async def all_profiles() -> None:
            for i, name in enumerate(names):
                rows.append(
                    await run_profile(settings, name, i, gw.url, data, prices, out, gw.proc.pid)
                )

        uvloop.run(all_profiles())
    finally:
        exit_code = stop_gateway(gw, 60)
        if gw.proc.stdout is not None:
            gw.proc.stdout.close()  # the reader thread has seen its end: the gateway exited
    report: dict[str, Any] = {
        "command": command or "python -m loadtest.straggler",
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "settings": {**asdict(settings), "config": str(settings.config), "out": str(out)},
        "machine": machine,
        "straggler": _straggler_of(settings.config),
        "prices": {"tier": prices.tier, "hedge_by_member": prices.hedge},
        "gateway_exit_code": exit_code,
        "profiles": rows,
    }
    report["goals"] = goals(rows)
    text = json.dumps(report, indent=2) + "\n"
    (out / "report.json").write_text(text)
    (out / "report.md").write_text(render_markdown(report))
    written: dict[str, Any] = json.loads(text)  # what the file says (tuples become lists)
    return written


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.straggler",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A short run: 2 s warm-up + 5 s per profile (about 1 min) unless set below.",
    )
    parser.add_argument(
        "--out", type=Path, help=f"Report directory (default {RESULTS_DIR}/straggler-<time>/)."
    )
    parser.add_argument(
        "--duration", type=float, help="Measured seconds per profile (default 30; quick: 5)."
    )
    parser.add_argument(
        "--warmup", type=float, help="Warm-up seconds per profile (default 5; quick: 2)."
    )
    parser.add_argument("--rps", type=float, default=100.0, help="Mean request rate (default 100).")
    parser.add_argument(
        "--slo-ms", type=float, default=25.0, help="Latency SLO in ms (default 25)."
    )
    parser.add_argument(
        "--deadline-ms",
        type=float,
        default=250.0,
        help="Request `timeout` parameter in ms (default 250: above the straggler's delay, so "
        "the gateway never answers partially because of it).",
    )
    parser.add_argument(
        "--feedback-share",
        type=float,
        default=1.0,
        help="Share of answers whose true labels are posted to the feedback API (default 1).",
    )
    parser.add_argument(
        "--profiles", help="Comma-separated profiles to run, in order (default: all in CONFIG)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Gateway config (default {DEFAULT_CONFIG.relative_to(ROOT)}).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of arrivals and samples.")
    parser.add_argument("--quiet", action="store_true", help="No progress lines from the runs.")
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 30.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    if duration <= 0 or warmup < 0 or args.rps <= 0 or args.slo_ms <= 0 or args.deadline_ms <= 0:
        parser.error("--duration, --rps, --slo-ms and --deadline-ms must be positive")
    if not 0 < args.feedback_share <= 1:
        parser.error("--feedback-share must be in (0, 1]")
    profiles = tuple(p.strip() for p in (args.profiles or "").split(",") if p.strip())
    return Settings(
        config=args.config.resolve(),
        out=args.out,
        rps=args.rps,
        duration_s=duration,
        warmup_s=warmup,
        slo_ms=args.slo_ms,
        deadline_ms=args.deadline_ms,
        feedback_share=args.feedback_share,
        profiles=profiles,
        seed=args.seed,
        quiet=args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from ensemble.errors import ConfigError
    from loadtest.fleet import TargetError
    from loadtest.scenario import ScenarioError

    settings = parse_args(argv)
    command = "python -m loadtest.straggler " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(settings, command.strip())
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except (ValueError, TargetError, ScenarioError, RuntimeError) as exc:
        say(f"cannot run: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    print(table(report))
    print()
    print(verdicts(report))
    print(f"report: {Path(report['settings']['out']) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
