"""`ensemble loadtest SCENARIO`: serve the target if asked, run the load, write the report."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command's modules load only when it runs, keeping `ensemble --help` quick
    from loadtest.gateway import Gateway
    from loadtest.scenario import Scenario

RESULTS_DIR = Path("loadtest/results")
EXIT_PASSED, EXIT_FAILED, EXIT_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    from loadtest.gateway import start_gateway, stop_gateway
    from loadtest.harness import execute
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


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.cli SCENARIO [--out DIR] [--quiet]`: `ensemble loadtest` run with
    this interpreter, whether or not the package's entry points are installed."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
