"""Faults under load: a cloud partition, a replica kill and a slow replica, each during a bounded
open-loop load on a real gateway with replica processes; answered share, p99, time to recover.

`python -m loadtest.resilience` (loadtest/README.md, "Faults under load").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.experiment import (
    CONFIGS,
    ROOT,
    Driver,
    Report,
    Run,
    add_common,
    goals_doc,
    new_parser,
    progress,
    run_tokens,
    settings_doc,
    split_list,
    write_report,
)
from loadtest.measure import CpuReading, cores, delta, drive, harness_report, scrape, total
from loadtest.recovery import RecoveryRule, analyse
from loadtest.resilience_report import (
    GOAL_ANSWERED,
    GOAL_RECOVERY_S,
    gateway_counters,
    goals,
    render_markdown,
    summary,
)

if TYPE_CHECKING:
    from loadtest.faults import Mark
    from loadtest.gateway import Gateway
    from loadtest.replicas import ReplicaProcess
    from loadtest.runner import GeneratorResult
    from loadtest.scenario import Scenario

NAME = "resilience"
DEFAULT_CONFIG = CONFIGS / "resilience.yaml"
FAULTS = ("partition", "kill", "slow")
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
    progress(NAME, line)


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
) -> Scenario:
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


def template_of(settings: Settings) -> tuple[dict[str, Any], dict[str, tuple[Path, str]]]:
    """The config template's document and its replicas (model, backend), checked against the
    replicas the faults act on."""
    import yaml

    template = settings.config
    doc: dict[str, Any] = yaml.safe_load(template.read_text())
    wanted = placeholders(doc, template.parent)
    for role in (settings.kill_replica, settings.slow_replica):
        if role not in wanted:
            raise ValueError(f"{template} has no replica {{{role}}}; it has {', '.join(wanted)}")
    if wanted[settings.slow_replica][1] != "oip-http":
        raise ValueError(f"the slow replica {settings.slow_replica} must be an oip-http endpoint")
    return doc, wanted


# --- one fault ---------------------------------------------------------------------------------


def window_of(marks: Sequence[Mark], hook: str) -> tuple[float, float] | None:
    """The fault's window from its hook's marks: its first mark to its last (None if it
    failed or never ran)."""
    own = [m for m in marks if m.name == hook]
    if len(own) < 2 or any(m.message.startswith("failed") for m in own):
        return None
    return own[0].at_s, own[-1].at_s


@dataclass
class FaultRun:
    """What the measured run of one fault left behind, for its row."""

    sc: Scenario | None = None
    event: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now().astimezone())
    marks: list[Mark] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    served: dict[str, int | None] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    replica_exits: dict[str, int | None] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)


async def run_fault(settings: Settings, fault: str, out: Path, data: Path) -> dict[str, Any]:
    """Fresh replicas and gateway, a warm-up, the measured run with the fault; its row."""
    import yaml

    from loadtest.gateway import start_gateway, stop_gateway
    from loadtest.replicas import ReplicaProcess

    here = out / fault
    here.mkdir(parents=True, exist_ok=True)
    doc, wanted = template_of(settings)
    replicas = {name: ReplicaProcess(name, model, here) for name, (model, _) in wanted.items()}
    gw: Gateway | None = None
    done = FaultRun()
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
        filled = fill(doc, settings.config.parent, endpoints)
        config.write_text(yaml.safe_dump(filled, sort_keys=False))
        say(f"{fault}: starting the gateway (log: {here / 'gateway.log'})")
        gw = await asyncio.to_thread(start_gateway, config, here / "gateway.log", 120)
        result = await _measure(settings, fault, gw, data, replicas, done)
    finally:
        if gw is not None:
            done.exit_code = await asyncio.to_thread(stop_gateway, gw, 60)
        done.replica_exits = {name: await r.stop() for name, r in replicas.items()}
        done.restarts = {name: r.starts - 1 for name, r in replicas.items() if r.starts > 1}
    assert done.sc is not None
    harness_report(
        done.sc, result, here, url=done.url, source=f"<resilience {fault}>",
        started=done.started, marks=done.marks, gateway_exit_code=done.exit_code,
    )  # fmt: skip
    return _row(settings, fault, result, done)


async def _measure(
    settings: Settings,
    fault: str,
    gw: Gateway,
    data: Path,
    replicas: dict[str, ReplicaProcess],
    done: FaultRun,
) -> GeneratorResult:
    """The warm-up and the measured run with the fault; fills ``done``, returns the result."""
    if settings.warmup_s > 0:
        warm = scenario_for(settings, f"{fault}-warmup", gw.url, data, settings.warmup_s, [])
        await drive(warm, gw.url, data, True, pid=gw.proc.pid)
    done.event = fault_event(settings, fault)
    done.sc = scenario_for(settings, fault, gw.url, data, settings.duration_s, [done.event])
    say(f"{fault}: {describe(settings, fault)}, at {settings.fault_at_s:g} s")
    before = await scrape(gw.url)
    cpu0 = CpuReading.of_tree()
    done.started = dt.datetime.now().astimezone()
    result, done.marks = await drive(
        done.sc, gw.url, data, settings.quiet, pid=gw.proc.pid, replicas=replicas
    )
    done.cpu = cores(cpu0, CpuReading.of_tree(), own_in_system=True)
    done.counters = gateway_counters(delta(before, await scrape(gw.url)))
    done.served = {name: await replica_requests(r.direct_url) for name, r in replicas.items()}
    done.url = gw.url
    return result


def _row(settings: Settings, fault: str, result: GeneratorResult, done: FaultRun) -> dict[str, Any]:
    window = window_of(done.marks, done.event["name"])
    row: dict[str, Any] = {
        "fault": fault,
        "description": describe(settings, fault),
        "hook": done.event,
        "marks": [{"at_s": m.at_s, "name": m.name, "message": m.message} for m in done.marks],
        "fault_applied": window is not None,
        "gateway_exit_code": done.exit_code,
        "replica_exit_codes": done.replica_exits,
        "restarts": done.restarts,
        "replica_requests": done.served,
        "gateway": done.counters,
        # Our process tree holds the generator, the gateway and the replicas.
        "cores": {"ours": done.cpu["system"], "others": done.cpu["others"]},
    }
    if window is None:
        at = settings.fault_at_s
        row.update(analyse(result.records, at, at, settings.rule))
        row["recovery_s"] = None
    else:
        # The window opens when the hook starts acting (its first mark comes after, e.g. once
        # the admin API has answered) and closes at its last mark (the fault undone, or the
        # restarted replica ready).
        start = min(settings.fault_at_s, window[0])
        row.update(analyse(result.records, start, window[1], settings.rule))
    return row


async def replica_requests(url: str) -> int | None:
    """Requests a replica process has answered since it (last) started, from its /metrics."""
    try:
        samples = await scrape(url)
    except (RuntimeError, OSError):
        return None
    return int(total(samples, "ensemble_requests_total"))


# --- the whole run -----------------------------------------------------------------------------


def run(settings: Settings, command: str = "") -> Report:
    """Every fault in turn; writes report.json and report.md; returns the report."""
    import uvloop
    import yaml

    from ensemble.models import ensure_zoo

    unknown = [f for f in settings.faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    this = Run(NAME, settings.out, command)
    # The template is validated when its filled copy is served; its zoo is built first.
    doc = yaml.safe_load(settings.config.read_text())
    zoo = (settings.config.parent / doc.get("model_zoo", {}).get("dir", "")).resolve()
    ensure_zoo(zoo, progress=say)
    rows: list[dict[str, Any]] = []

    async def every_fault() -> None:
        for fault in settings.faults:
            rows.append(await run_fault(settings, fault, this.out, zoo / "test.npz"))

    # The partition fault needs the gateway's admin token; one made up for this run will do.
    with run_tokens(TOKEN_ENV):
        uvloop.run(every_fault())
    goal_targets = {"answered_share": GOAL_ANSWERED, "recovery_s": GOAL_RECOVERY_S}
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out), goals=goal_targets),
        "faults": rows,
        "goals": goals_doc(goals(rows)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME)
    d = Settings()
    add = parser.add_argument
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
        faults=split_list(args.faults),
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


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
