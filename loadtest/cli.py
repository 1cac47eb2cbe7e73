"""`ensemble loadtest SCENARIO`: serve the target if asked, run the load, write the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command's modules load only when it runs, keeping `ensemble --help` quick
    from collections.abc import Mapping

    from loadtest.faults import Mark, ReplicaControl
    from loadtest.fleet import Fleet, Job
    from loadtest.runner import GeneratorResult
    from loadtest.scenario import Scenario

RESULTS_DIR = Path("loadtest/results")
READY = re.compile(r"ensemble (?:gateway|replica) ready: http=(\S+):(\d+) grpc=(\S+):(\d+)")
EXIT_PASSED, EXIT_FAILED, EXIT_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def register(subparsers: Any) -> None:
    """Add the `loadtest` command to the `ensemble` parser."""
    parser = subparsers.add_parser(
        "loadtest",
        help="Run a load-test scenario and check its SLOs.",
        description=(
            "Run the scenario's open- or closed-loop load against a running gateway (target.url "
            "/ target.grpc) or one the harness serves from target.config, check every answer's "
            "label, and write report.json, report.md and PNG plots. Exit 0 when every SLO check "
            "passes, 1 when one fails, 2 when the scenario is invalid or the run cannot start, "
            "130 after Ctrl-C (which stops sending and still writes the report)."
        ),
    )
    parser.add_argument("scenario", type=Path, help="Scenario YAML (see loadtest/README.md).")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"Report directory (default: {RESULTS_DIR}/<scenario name>-<timestamp>/).",
    )
    parser.add_argument("--quiet", action="store_true", help="No live progress line on stderr.")
    parser.set_defaults(func=cmd_loadtest)


def _say(line: str) -> None:
    print(f"loadtest: {line}", file=sys.stderr, flush=True)


@dataclass
class Gateway:
    """A gateway the harness started, and the addresses it announced."""

    proc: subprocess.Popen[str]
    url: str
    grpc: str


def start_gateway(config: Path, log_path: Path, timeout_s: float) -> Gateway:
    """`ensemble serve CONFIG` on free ports; returns once its ready line is printed."""
    return start_server(
        ["serve", str(config), "--http-port", "0", "--grpc-port", "0"], log_path, timeout_s
    )


def start_server(
    args: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None
) -> Gateway:
    """`ensemble ARGS...` (`serve` or `replica`), with ``env`` added to this process's
    environment; returns once its ready line is printed."""
    cmd = [sys.executable, "-m", "ensemble.cli", *args]
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C is for the harness; it stops the gateway itself
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and sel.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break
            match = READY.search(line)
            if match:
                host, http_port, ghost, grpc_port = match.groups()
                # Keep reading stdout so the gateway never blocks on a full pipe.
                threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                return Gateway(proc, f"http://{host}:{http_port}", f"{ghost}:{grpc_port}")
    proc.kill()
    proc.wait()
    proc.stdout.close()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    from loadtest.fleet import TargetError

    raise TargetError(f"`ensemble {args[0]}` did not become ready within {timeout_s:g} s:\n{tail}")


def _drain(stream: IO[str]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for _ in stream:
            pass


def stop_gateway(gw: Gateway, timeout_s: float) -> int:
    """SIGCONT (a pause fault may have left it stopped), SIGTERM, wait; kill if it hangs."""
    if gw.proc.poll() is None:
        gw.proc.send_signal(signal.SIGCONT)
        gw.proc.send_signal(signal.SIGTERM)
    try:
        return gw.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _say(f"gateway did not exit {timeout_s:g} s after SIGTERM; killing it")
        gw.proc.kill()
        return gw.proc.wait()


async def _progress(fleet: Fleet, start_at: float, planned_s: float, quiet: bool) -> None:
    """A live line on stderr: rewritten in place on a terminal, every 5 s in a log."""
    from loadtest.runner import Histogram

    tty = sys.stderr.isatty()
    interval = 0.5 if tty else 5.0
    last_ok, last_t = 0, time.monotonic()
    while not quiet:
        await asyncio.sleep(interval)
        snap, now = fleet.snapshot(), time.monotonic()
        rps = (snap.ok - last_ok) / max(now - last_t, 1e-9)
        last_ok, last_t = snap.ok, now
        p99 = Histogram.of(snap.hist).quantile(0.99)
        line = (
            f"loadtest: {max(now - start_at, 0):6.1f}/{planned_s:g} s  sent {snap.sent}  "
            f"answered {snap.ok}  {rps:7.1f} req/s  "
            f"p99 {'-' if p99 is None else f'{p99 * 1000:.1f} ms'}  errors {snap.errors}"
        )
        sys.stderr.write(f"\r{line:<100}" if tty else line + "\n")
        sys.stderr.flush()


async def execute(
    job: Job,
    pid: int | None,
    planned_s: float,
    quiet: bool,
    replicas: Mapping[str, ReplicaControl] | None = None,
) -> tuple[GeneratorResult, list[Mark], bool]:
    """Run the load, the faults and the progress line together; Ctrl-C ends the load early.
    ``replicas`` are replica processes the caller started, for the replica fault hooks."""
    from loadtest import faults
    from loadtest.faults import FaultContext, FaultEvent
    from loadtest.fleet import make_fleet

    sc = job.scenario
    fleet = make_fleet(job)
    await fleet.start()
    start_at = time.monotonic() + 0.2
    ctx = FaultContext(
        pid,
        elapsed=lambda: time.monotonic() - start_at,
        gateway_url=job.url,
        replicas=dict(replicas or {}),
    )
    events = [
        FaultEvent(f.at_s, f.name, faults.validate_params(f.name, f.params)) for f in sc.faults
    ]

    async def sleep_until(at_s: float) -> None:
        await asyncio.sleep(max(0.0, start_at + at_s - time.monotonic()))

    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        _say("interrupted: stopping the load, waiting for answers in flight")
        fleet.stop()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    helpers = [
        asyncio.ensure_future(faults.run_faults(events, ctx, sleep_until)),
        asyncio.ensure_future(_progress(fleet, start_at, planned_s, quiet)),
    ]
    try:
        result = await fleet.run(start_at)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in helpers:
            task.cancel()  # a pause still running resumes the gateway on its way out
        await asyncio.gather(*helpers, return_exceptions=True)
        if not quiet and sys.stderr.isatty():
            sys.stderr.write("\n")
    return result, ctx.marks, interrupted


def _data_path(sc: Scenario) -> Path:
    """The npz requests come from: the scenario's, else the target's model zoo (built if needed)."""
    if sc.request.data is not None:
        return sc.resolve(sc.request.data)
    from ensemble.models import default_zoo_dir, ensure_zoo

    zoo = default_zoo_dir()
    if sc.target.config is not None:
        from ensemble.config import load_config

        zoo = load_config(sc.resolve(sc.target.config)).zoo_dir()
    ensure_zoo(zoo, progress=_say)
    return zoo / "test.npz"


def provide_feedback_token(sc: Scenario) -> None:
    """Before the harness starts a gateway for a scenario with feedback: the gateway and the
    generators get the same feedback token, the one in ``feedback.token_env`` or, when that is
    unset, a random one made for this run."""
    if sc.feedback is None:
        return
    from ensemble.auth import FEEDBACK_TOKEN_ENV

    token = os.environ.get(sc.feedback.token_env) or secrets.token_hex(16)
    os.environ[sc.feedback.token_env] = token  # generator processes inherit the environment
    os.environ[FEEDBACK_TOKEN_ENV] = token  # the variable the gateway reads


def _prepare(args: argparse.Namespace) -> tuple[Scenario, Path, tuple[float, ...] | None]:
    from ensemble.errors import ConfigError
    from loadtest.scenario import ScenarioError, TraceLoad, load_scenario
    from loadtest.shapes import read_trace

    sc = load_scenario(args.scenario)
    try:
        data = _data_path(sc)
        trace = read_trace(sc.resolve(sc.load.path)) if isinstance(sc.load, TraceLoad) else None
    except ConfigError as exc:
        raise ScenarioError(list(exc.errors)) from None
    except (OSError, ValueError) as exc:
        raise ScenarioError([str(exc)]) from None
    return sc, data, None if trace is None else tuple(trace)


def cmd_loadtest(args: argparse.Namespace) -> int:
    import uvloop

    from loadtest.fleet import Job, TargetError
    from loadtest.plots import write_plots
    from loadtest.report import RunInfo, build_report, write_report
    from loadtest.scenario import ScenarioError
    from loadtest.shapes import schedule_duration

    try:
        sc, data, trace = _prepare(args)
    except ScenarioError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{args.scenario}: invalid scenario ({len(exc.errors)} error(s))", file=sys.stderr)
        return EXIT_UNUSABLE
    name = sc.display_name(args.scenario)
    started = dt.datetime.now().astimezone()
    out = args.out or RESULTS_DIR / f"{name}-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    gw: Gateway | None = None
    exit_code: int | None = None
    try:
        url, grpc = sc.target.url, sc.target.grpc
        if sc.target.config is not None:
            provide_feedback_token(sc)
            _say(f"starting the gateway on {sc.target.config} (log: {out / 'gateway.log'})")
            gw = start_gateway(
                sc.resolve(sc.target.config), out / "gateway.log", sc.target.startup_timeout_s
            )
            url, grpc = gw.url, gw.grpc
        elif sc.feedback is not None and not os.environ.get(sc.feedback.token_env):
            raise TargetError(
                f"feedback needs the gateway's feedback token in ${sc.feedback.token_env}"
            )
        job = Job(sc, url, grpc, data, trace)
        planned = schedule_duration(sc.load, trace)
        _say(f"{name}: {sc.protocol} to {grpc if sc.protocol == 'grpc' else url}, {planned:g} s")
        pid = gw.proc.pid if gw else None
        result, marks, interrupted = uvloop.run(execute(job, pid, planned, args.quiet))
    except TargetError as exc:
        _say(f"cannot run {args.scenario}: {exc}")
        return EXIT_UNUSABLE
    finally:
        if gw is not None:
            exit_code = stop_gateway(gw, sc.target.stop_timeout_s)
    info = RunInfo(
        name, str(args.scenario), started.isoformat(timespec="seconds"), url, grpc,
        gw is not None, exit_code, marks, interrupted,
    )  # fmt: skip
    report = build_report(sc, result, info)
    write_report(report, out)
    write_plots(report, out)
    print(summary(report, out))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if report["slo"]["passed"] else EXIT_FAILED


def summary(report: dict[str, Any], out: Path) -> str:
    """What the terminal shows at the end: verdict, headline numbers, failures, warnings."""
    lat, req, checks = report["latency_ms"], report["requests"], report["slo"]["checks"]
    passed = sum(c["passed"] for c in checks)
    verdict = "PASSED" if report["slo"]["passed"] else "FAILED"

    def num(value: float | None, spec: str = ".1f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"loadtest {report['scenario']['name']}: {verdict} ({passed}/{len(checks)} SLO checks)",
        f"  sent {req['sent']}, answered {req['answered']} ({req['degraded']} degraded), "
        f"errors {req['errors']}; "
        f"throughput {report['throughput_rps']:.1f} req/s, goodput {report['goodput_rps']:.1f} "
        f"req/s, accuracy {num(report['accuracy'], '.4f')}",
        f"  latency ms: p50 {num(lat['p50'])}  p95 {num(lat['p95'])}  p99 {num(lat['p99'])}  "
        f"max {num(lat['max'])}; send lag p99 "
        f"{num(report['generator']['send_lag_ms']['p99'], '.2f')} ms",
    ]
    for c in checks:
        if not c["passed"]:
            lines.append(
                f"  FAIL {c['name']}: {num(c['actual'], 'g')} {c['unit']} "
                f"(target {c['op']} {c['target']:g} {c['unit']})".replace("  (", " (")
            )
    lines += [f"  warning: {w}" for w in report["warnings"]]
    lines.append(f"  report: {out / 'report.md'}")
    return "\n".join(lines)
