"""Faults under load: a cloud partition, a replica kill and a slow replica, each during a bounded
open-loop load on a real gateway with replica processes; answered share, p99, time to recover.

`python -m loadtest.resilience` (loadtest/README.md, "Faults under load").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.recovery import RecoveryRule, analyse

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "loadtest" / "configs" / "resilience.yaml"
RESULTS_DIR = ROOT / "loadtest" / "results"
FAULTS = ("partition", "kill", "slow")
GOAL_ANSWERED = 0.999
GOAL_RECOVERY_S = 5.0
TOKEN_ENV = "ENSEMBLE_ADMIN_TOKEN"
PLACEHOLDER = re.compile(r"^\{([A-Za-z0-9_]+)\}$")

DESCRIPTION = f"""\
Faults under load.

For each fault (default: {", ".join(FAULTS)}), on a fresh set of processes: starts the replica
processes CONFIG names ("{{NAME}}" endpoints; `ensemble replica MODEL.onnx` on free ports, the
slow replica behind a delay proxy in this process), serves the filled config with
`ensemble serve` (free ports, SIGTERM at the end), sends a --warmup run, then a measured
open-loop run at a constant --rps for --duration seconds (HTTP, binary tensors, one generator in
this process; every request carries `timeout` --deadline-ms) and injects the fault at --at for
--fault seconds:
  partition  the cloud tier's emulated link cut off through the admin API (`partition` hook)
  kill       SIGKILL of one replica process, started again on its ports after --fault seconds
             (`kill_replica` hook; the fault ends when the new process is ready)
  slow       every request to one replica delayed --slow-ms by its proxy (`slow_replica` hook)
Per fault: requests sent, answered share (HTTP 200), degraded share (answers flagged degraded),
errors by kind, p50/p99 over the run and in the fault window, and the time to recover: from the
fault's end to the first of --recovery-window requests in a row (in send order) that were all
answered, not degraded, and within max(--latency-factor x the pre-fault p99, --min-threshold-ms).
Goals: >= {100 * GOAL_ANSWERED:g}% answered and recovery <= {GOAL_RECOVERY_S:g} s, per fault.
Writes OUT/report.json, OUT/report.md and each run's harness report under OUT/<fault>/, and
prints the table. Exit 0 when the runs completed (whatever the goals say), 2 when they could not.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    config: Path = DEFAULT_CONFIG
    out: Path | None = None
    faults: tuple[str, ...] = FAULTS
    rps: float = 50.0
    duration_s: float = 15.0
    warmup_s: float = 2.0
    fault_at_s: float = 5.0
    fault_s: float = 3.0
    slow_ms: float = 200.0
    kill_replica: str = "forest_a"
    slow_replica: str = "forest_b"
    partition_tier: str = "cloud"
    deadline_ms: float = 1000.0
    rule: RecoveryRule = field(default_factory=RecoveryRule)
    seed: int = 0
    quiet: bool = False


def say(line: str) -> None:
    print(f"resilience: {line}", file=sys.stderr, flush=True)


# --- the fleet ---------------------------------------------------------------------------------


def placeholders(doc: dict[str, Any], base: Path) -> dict[str, tuple[Path, str]]:
    """Replica name -> (the member's model, absolute; the placement's backend), from every
    "{NAME}" endpoint of the config template."""
    found: dict[str, tuple[Path, str]] = {}
    for ensemble in doc.get("ensembles", []):
        for member in ensemble.get("members", []):
            for placement in member.get("placement", []):
                for endpoint in placement.get("endpoints") or []:
                    match = PLACEHOLDER.match(str(endpoint))
                    if match is None:
                        continue
                    if match[1] in found:
                        raise ValueError(f"replica {match[1]!r} is named twice in the config")
                    backend = placement.get("backend", "inprocess")
                    found[match[1]] = ((base / member["model"]).resolve(), backend)
    return found


def fill(doc: dict[str, Any], base: Path, endpoints: dict[str, str]) -> dict[str, Any]:
    """The template with its placeholders replaced and its paths made absolute (the filled
    config is written elsewhere)."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    for ensemble in out.get("ensembles", []):
        for member in ensemble.get("members", []):
            member["model"] = str((base / member["model"]).resolve())
            if member.get("card"):
                member["card"] = str((base / member["card"]).resolve())
            for placement in member.get("placement", []):
                if placement.get("endpoints"):
                    placement["endpoints"] = [
                        endpoints[m[1]] if (m := PLACEHOLDER.match(str(e))) else e
                        for e in placement["endpoints"]
                    ]
    zoo = out.setdefault("model_zoo", {})
    zoo["dir"] = str((base / zoo.get("dir", "../models/digits")).resolve())
    return out


def fault_event(settings: Settings, fault: str) -> dict[str, Any]:
    """The scenario's fault entry for one of FAULTS."""
    at, length = settings.fault_at_s, settings.fault_s
    if fault == "partition":
        params: dict[str, Any] = {"tier": settings.partition_tier, "duration_s": length}
        return {"at_s": at, "name": "partition", "params": params}
    if fault == "kill":
        params = {"replica": settings.kill_replica, "down_s": length}
        return {"at_s": at, "name": "kill_replica", "params": params}
    if fault == "slow":
        params = {"replica": settings.slow_replica, "delay_ms": settings.slow_ms}
        return {"at_s": at, "name": "slow_replica", "params": {**params, "duration_s": length}}
    raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


def describe(settings: Settings, fault: str) -> str:
    if fault == "partition":
        return (
            f"cloud partition: tier `{settings.partition_tier}` cut off for {settings.fault_s:g} s"
        )
    if fault == "kill":
        return (
            f"replica kill: `{settings.kill_replica}` SIGKILLed, restarted on its ports after "
            f"{settings.fault_s:g} s"
        )
    slow = f"+{settings.slow_ms:g} ms for {settings.fault_s:g} s"
    return f"slow replica: `{settings.slow_replica}` {slow}"


def scenario_for(
    settings: Settings, name: str, url: str, data: Path, duration_s: float, faults: list[Any]
) -> Any:
    """The harness scenario of one run, validated like any scenario file."""
    from loadtest.scenario import parse_scenario

    doc = {
        "name": name,
        "description": f"Faults under load: {name}.",
        "target": {"url": url},
        "protocol": "http_binary",
        "model": "digits",
        "request": {"data": str(data), "timeout_s": 10},
        "load": {"shape": "constant", "rps": settings.rps, "duration_s": duration_s},
        "mix": [{"name": "default", "parameters": {"timeout": round(settings.deadline_ms * 1000)}}],
        "faults": faults,
        "limits": {"max_requests": int(settings.rps * duration_s) + 10, "drain_timeout_s": 15},
        "seed": settings.seed,
    }
    return parse_scenario(doc, source=f"<resilience {name}>", base_dir=ROOT)


# --- one fault ---------------------------------------------------------------------------------


def window_of(marks: list[Any], hook: str) -> tuple[float, float] | None:
    """The fault's window from its hook's marks: its first mark to its last (None if it
    failed or never ran)."""
    own = [m for m in marks if m.name == hook]
    if len(own) < 2 or any(m.message.startswith("failed") for m in own):
        return None
    return own[0].at_s, own[-1].at_s


async def run_fault(settings: Settings, fault: str, out: Path, data: Path) -> dict[str, Any]:
    """Fresh replicas and gateway, a warm-up, the measured run with the fault; its row."""
    import yaml

    from loadtest.cli import Gateway, execute, start_gateway, stop_gateway
    from loadtest.fleet import Job
    from loadtest.peers import machine_busy_seconds, tree_cpu_seconds
    from loadtest.replicas import ReplicaProcess
    from loadtest.report import RunInfo, build_report, write_report
    from loadtest.straggler import delta, scrape

    here = out / fault
    here.mkdir(parents=True, exist_ok=True)
    template = settings.config
    doc = yaml.safe_load(template.read_text())
    wanted = placeholders(doc, template.parent)
    for role in (settings.kill_replica, settings.slow_replica):
        if role not in wanted:
            raise ValueError(f"{template} has no replica {{{role}}}; it has {', '.join(wanted)}")
    if wanted[settings.slow_replica][1] != "oip-http":
        raise ValueError(f"the slow replica {settings.slow_replica} must be an oip-http endpoint")
    replicas = {name: ReplicaProcess(name, model, here) for name, (model, _) in wanted.items()}
    gw: Gateway | None = None
    exit_code: int | None = None
    try:
        say(f"{fault}: starting {len(replicas)} replica processes")
        await asyncio.gather(
            *(r.start(proxied=name == settings.slow_replica) for name, r in replicas.items())
        )
        endpoints = {
            name: r.http_url if wanted[name][1] == "oip-http" else r.grpc_target
            for name, r in replicas.items()
        }
        config = here / "gateway.yaml"
        config.write_text(yaml.safe_dump(fill(doc, template.parent, endpoints), sort_keys=False))
        say(f"{fault}: starting the gateway (log: {here / 'gateway.log'})")
        gw = await asyncio.to_thread(start_gateway, config, here / "gateway.log", 120)
        if settings.warmup_s > 0:
            warm = scenario_for(settings, f"{fault}-warmup", gw.url, data, settings.warmup_s, [])
            await execute(Job(warm, gw.url, None, data, None), gw.proc.pid, settings.warmup_s, True)
        event = fault_event(settings, fault)
        sc = scenario_for(settings, fault, gw.url, data, settings.duration_s, [event])
        say(f"{fault}: {describe(settings, fault)}, at {settings.fault_at_s:g} s")
        before = await scrape(gw.url)
        cpu0 = (time.monotonic(), tree_cpu_seconds(os.getpid()), machine_busy_seconds())
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        result, marks, interrupted = await execute(
            Job(sc, gw.url, None, data, None), gw.proc.pid, settings.duration_s, settings.quiet,
            replicas,
        )  # fmt: skip
        cpu1 = (time.monotonic(), tree_cpu_seconds(os.getpid()), machine_busy_seconds())
        if interrupted:
            raise KeyboardInterrupt
        counters = gateway_counters(delta(before, await scrape(gw.url)))
        served = {name: await replica_requests(r.direct_url) for name, r in replicas.items()}
        url = gw.url
    finally:
        if gw is not None:
            exit_code = await asyncio.to_thread(stop_gateway, gw, 60)
            if gw.proc.stdout is not None:
                gw.proc.stdout.close()
        replica_exits = {name: await r.stop() for name, r in replicas.items()}
    info = RunInfo(sc.name, f"<resilience {fault}>", started, url, None, True, exit_code, marks)
    write_report(build_report(sc, result, info), here)
    wall, own, busy = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    window = window_of(marks, event["name"])
    row: dict[str, Any] = {
        "fault": fault,
        "description": describe(settings, fault),
        "hook": event,
        "marks": [{"at_s": m.at_s, "name": m.name, "message": m.message} for m in marks],
        "fault_applied": window is not None,
        "gateway_exit_code": exit_code,
        "replica_exit_codes": replica_exits,
        "restarts": {name: r.starts - 1 for name, r in replicas.items() if r.starts > 1},
        "replica_requests": served,
        "gateway": counters,
        "cores": {"ours": round(own / wall, 3), "others": round(max(0.0, busy - own) / wall, 3)},
    }
    if window is None:
        row.update(analyse(result.records, settings.fault_at_s, settings.fault_at_s, settings.rule))
        row["recovery_s"] = None
    else:
        # The window opens when the hook starts acting (its first mark comes after, e.g. once
        # the admin API has answered) and closes at its last mark (the fault undone, or the
        # restarted replica ready).
        start = min(settings.fault_at_s, window[0])
        row.update(analyse(result.records, start, window[1], settings.rule))
    row["goals"] = {
        "answered": row["run"]["answered_share"] is not None
        and row["run"]["answered_share"] >= GOAL_ANSWERED,
        "recovery": row["recovery_s"] is not None and row["recovery_s"] <= GOAL_RECOVERY_S,
    }
    return row


async def replica_requests(url: str) -> int | None:
    """Requests a replica process has answered since it (last) started, from its /metrics."""
    from loadtest.straggler import scrape

    try:
        samples = await scrape(url)
    except (RuntimeError, OSError):
        return None
    return int(sum(v for (n, _), v in samples.items() if n == "ensemble_requests_total"))


def gateway_counters(change: dict[Any, float]) -> dict[str, Any]:
    """What the gateway did about the fault, from its /metrics over the measured run."""

    def total(name: str, **match: str) -> int:
        return int(
            sum(
                v
                for (n, labels), v in change.items()
                if n == name and all(dict(labels).get(k) == want for k, want in match.items())
            )
        )

    return {
        "retries": total("ensemble_retries_total"),
        "hedges_sent": total("ensemble_hedges_total", outcome="sent"),
        "hedges_won": total("ensemble_hedges_total", outcome="won"),
        "ejections": total("ensemble_replica_ejections_total"),
        "degraded_answers": total("ensemble_degraded_answers_total"),
        "failed_member_calls": sum(
            int(v)
            for (n, labels), v in change.items()
            if n == "ensemble_member_calls_total" and dict(labels).get("outcome") != "success"
        ),
    }


# --- report ------------------------------------------------------------------------------------


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + unit


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.2f} %"


def table(report: dict[str, Any]) -> str:
    """The Markdown table of the faults."""
    lines = [
        "| fault | sent | answered | degraded | errors | p50 / p99 ms (run) | p99 ms in fault "
        "window | fault window s | time to recover | goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["faults"]:
        run, win = r["run"], r["window"]
        errors = ", ".join(f"{n} {k}" for k, n in run["errors"].items()) or "0"
        met = [name for name, ok in r["goals"].items() if ok]
        goals = "both met" if len(met) == 2 else ("met: " + ", ".join(met) if met else "not met")
        lines.append(
            f"| {r['fault']} | {run['sent']} | {_pct(run['answered_share'])} "
            f"| {_pct(run['degraded_share'])} | {errors} "
            f"| {_num(run['latency_ms']['p50'], '.1f')} / {_num(run['latency_ms']['p99'], '.1f')} "
            f"| {_num(win['latency_ms']['p99'], '.1f')} "
            f"| {win['start_s']:.2f}-{win['end_s']:.2f} "
            f"| {_num(r['recovery_s'], '.2f', ' s')} | {goals} |"
        )
    return "\n".join(lines)


def verdicts(report: dict[str, Any]) -> str:
    lines = []
    for goal, what in (
        ("answered", f">= {100 * GOAL_ANSWERED:g}% of requests answered (degraded allowed)"),
        ("recovery", f"recovery <= {GOAL_RECOVERY_S:g} s after the fault ends"),
    ):
        missed = [r["fault"] for r in report["faults"] if not r["goals"][goal]]
        verdict = "MET for every fault" if not missed else "NOT MET for " + ", ".join(missed)
        lines.append(f"goal {what}: {verdict}")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    s, m, rule = report["settings"], report["machine"], report["settings"]["rule"]
    lines = [
        "# Faults under load",
        "",
        f"- command: `{report['command']}`",
        f"- config: `{s['config']}` (filled copies under each fault's directory)",
        f"- load per fault: {s['warmup_s']:g} s warm-up, then constant {s['rps']:g} req/s for "
        f"{s['duration_s']:g} s, fault at {s['fault_at_s']:g} s for {s['fault_s']:g} s; HTTP "
        f"binary tensors, one generator in this process; request `timeout` {s['deadline_ms']:g} ms",
        f"- recovered: {rule['window']} requests in a row answered, not degraded, within "
        f"max({rule['latency_factor']:g} x pre-fault p99, {rule['min_threshold_ms']:g} ms); "
        f"baseline from {rule['baseline_from_s']:g} s to the fault",
        f"- machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average "
        f"before: {m['loadavg_before']}; code: {m['git']}",
        f"- started {report['started_at']}, took {report['elapsed_s']:.0f} s",
        "",
        table(report),
        "",
        "```",
        verdicts(report),
        "```",
        "",
        "## Per fault",
        "",
        "| fault | window: sent / answered / degraded | baseline p99 ms | threshold ms | retries "
        "| hedges sent (won) | ejections | failed member calls | cores: ours / others |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["faults"]:
        w, g = r["window"], r["gateway"]
        lines.append(
            f"| {r['fault']} | {w['sent']} / {_pct(w['answered_share'])} / "
            f"{_pct(w['degraded_share'])} | {_num(r['baseline']['latency_ms']['p99'], '.1f')} "
            f"| {r['threshold_ms']:.1f} | {g['retries']} | {g['hedges_sent']} ({g['hedges_won']}) "
            f"| {g['ejections']} | {g['failed_member_calls']} "
            f"| {r['cores']['ours']:.2f} / {r['cores']['others']:.2f} |"
        )
    lines.append("")
    for r in report["faults"]:
        lines += [f"### {r['fault']}: {r['description']}", ""]
        lines += [f"- {mk['at_s']:.2f} s: `{mk['name']}` {mk['message']}" for mk in r["marks"]]
        if not r["fault_applied"]:
            lines.append("- **the fault was not applied** (see the marks)")
        lines.append("")
    return "\n".join(lines)


# --- the whole run -----------------------------------------------------------------------------


def run(settings: Settings, command: str = "") -> dict[str, Any]:
    """Every fault in turn; writes report.json and report.md; returns the report."""
    import uvloop
    import yaml

    from ensemble.models import ensure_zoo
    from loadtest.straggler import _git_state

    unknown = [f for f in settings.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    started = dt.datetime.now().astimezone()
    out = settings.out or RESULTS_DIR / f"resilience-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    # The template is validated when its filled copy is served; its zoo is built first.
    doc = yaml.safe_load(settings.config.read_text())
    zoo = (settings.config.parent / doc.get("model_zoo", {}).get("dir", "")).resolve()
    ensure_zoo(zoo, progress=say)
    data = zoo / "test.npz"
    # The partition fault needs the gateway's admin token; one made up for this run will do.
    os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "git": _git_state(),
    }
    clock = time.monotonic()
    rows: list[dict[str, Any]] = []

    async def every_fault() -> None:
        for fault in settings.faults:
            rows.append(await run_fault(settings, fault, out, data))

    uvloop.run(every_fault())
    report: dict[str, Any] = {
        "command": command or "python -m loadtest.resilience",
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - clock, 1),
        "settings": {
            **asdict(settings),
            "config": str(settings.config),
            "out": str(out),
            "goals": {"answered_share": GOAL_ANSWERED, "recovery_s": GOAL_RECOVERY_S},
        },
        "machine": machine,
        "faults": rows,
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "report.json").write_text(text)
    (out / "report.md").write_text(render_markdown(report))
    written: dict[str, Any] = json.loads(text)
    return written


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.resilience",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings()
    add = parser.add_argument
    add("--out", type=Path, help=f"Report directory (default {RESULTS_DIR}/resilience-<time>/).")
    add("--faults", default=",".join(FAULTS), help="Comma-separated faults to run, in order.")
    add("--config", type=Path, default=d.config, help="Gateway config template.")
    add("--rps", type=float, default=d.rps, help=f"Constant request rate (default {d.rps:g}).")
    add("--duration", type=float, default=d.duration_s, help="Measured seconds per fault.")
    add("--warmup", type=float, default=d.warmup_s, help="Warm-up seconds per fault.")
    add("--at", type=float, default=d.fault_at_s, help="When the fault starts, seconds.")
    add("--fault", type=float, default=d.fault_s, help="How long the fault lasts, seconds.")
    add("--slow-ms", type=float, default=d.slow_ms, help="Delay added by the slow replica, ms.")
    add("--deadline-ms", type=float, default=d.deadline_ms, help="Request `timeout`, ms.")
    add("--recovery-window", type=int, default=d.rule.window, help="Requests in a row.")
    add("--latency-factor", type=float, default=d.rule.latency_factor)
    add("--min-threshold-ms", type=float, default=d.rule.min_threshold_ms)
    add("--seed", type=int, default=d.seed, help="Seed of arrivals and samples.")
    add("--quiet", action="store_true", help="No progress lines from the runs.")
    args = parser.parse_args(argv)
    if min(args.rps, args.duration, args.fault, args.slow_ms, args.deadline_ms) <= 0:
        parser.error("--rps, --duration, --fault, --slow-ms and --deadline-ms must be positive")
    if not 0 < args.at < args.duration or args.warmup < 0 or args.recovery_window < 1:
        parser.error("--at must fall inside --duration; --warmup >= 0; --recovery-window >= 1")
    rule = RecoveryRule(
        window=args.recovery_window,
        latency_factor=args.latency_factor,
        min_threshold_ms=args.min_threshold_ms,
        baseline_from_s=min(d.rule.baseline_from_s, args.at / 2),
    )
    return replace(
        d,
        config=args.config.resolve(),
        out=args.out,
        faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()),
        rps=args.rps,
        duration_s=args.duration,
        warmup_s=args.warmup,
        fault_at_s=args.at,
        fault_s=args.fault,
        slow_ms=args.slow_ms,
        deadline_ms=args.deadline_ms,
        rule=rule,
        seed=args.seed,
        quiet=args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from loadtest.fleet import TargetError
    from loadtest.scenario import ScenarioError

    settings = parse_args(argv)
    command = "python -m loadtest.resilience " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(settings, command.strip())
    except (ValueError, TargetError, ScenarioError, RuntimeError, OSError) as exc:
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
