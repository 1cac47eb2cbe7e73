"""The gateway against Ray Serve, onnxruntime alone and a no-op server."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadtest import bench_report as report
from loadtest.bench_clients import (
    GrpcLoad,
    LoadResult,
    oip_grpc_body,
    oip_http_body,
    oip_http_headers,
    run_open_loop,
)
from loadtest.experiment import (
    CONFIGS,
    ROOT,
    Driver,
    Report,
    Run,
    add_common,
    new_parser,
    progress,
    write_report,
)
from loadtest.httpclient import encode_request
from loadtest.peers import Peer, PendingPeer, free_port, machine_busy_seconds, spawn
from loadtest.wrk import WrkError, WrkResult, run_wrk, write_script, wrk_binary

NAME = "bench"
BENCH_CONFIG = CONFIGS / "bench.yaml"
DEFAULT_CONFIG = CONFIGS / "bench5.yaml"
INFER_PATH = "/v2/models/digits/infer"
DESCRIPTION = """The gateway against Ray Serve, onnxruntime alone and a no-op server.

Systems, all serving the digits ensemble of ``loadtest/configs/bench.yaml`` (logreg, mlp_small,
forest; mean of class probabilities) from the same ONNX files:

  gateway-http, gateway-grpc  `ensemble serve` in a subprocess (one process: --workers 1)
  gateway2w-http, -grpc       `ensemble serve --workers 2`: a supervisor and two workers
                              (--workers N for another count; 1 leaves these rows out)
  ray-http                    a Ray Serve application (loadtest.peers.ray_app) in a subprocess
  floor                       the members run back to back in this process at batch 1
  noop-http, noop-grpc        a server that reads the body and answers a fixed OIP response on the
                              same stack (loadtest.peers.noop): the ceiling, and the generators' own
  baseline-http, -grpc        with --baseline DIR: the gateway of another source tree, e.g. an
                              earlier commit's (closed loop only)
  gateway5-http               the gateway serving configs/local.yaml's 5 members for reference
                              (loadtest/configs/bench5.yaml: its admission does not shed)

Closed loop: wrk (one thread) over HTTP, grpc.aio generator processes over gRPC, at each
concurrency, the systems interleaved, each measurement after a warm-up; Ray Serve is started
after the others' turns and measured alone (idle, its processes keep ~0.14 cores busy).
Open loop: the harness's HTTP client (loadtest.httpclient, driven by loadtest.bench_clients) at
fixed rates, latency from each request's intended send time.
Writes OUT/report.json, OUT/report.md and the peers' logs under OUT/logs/, and prints a table;
progress goes to stderr. Exit 0 when every measurement completed (whatever the goals say), 1
when one saw failed requests or the peers disagreed, 2 when the run could not start (wrk
missing, a peer did not start).
"""


@dataclass(frozen=True)
class Plan:
    """What one run measures and for how long."""

    concurrency: tuple[int, ...]
    warmup_s: int
    duration_s: int
    rates: tuple[float, ...]
    grpc: bool = True
    default5: bool = True
    workers: int = 2
    """Worker processes of the second gateway row (1: no such row)."""
    floor_iterations: int = 5000


PLANS = {
    "full": Plan(concurrency=(1, 8, 32, 64), warmup_s=2, duration_s=10, rates=(100, 500)),
    "quick": Plan(concurrency=(1, 8, 32, 64), warmup_s=1, duration_s=2, rates=(100, 500)),
    "smoke": Plan(
        concurrency=(1, 32),
        warmup_s=1,
        duration_s=1,
        rates=(100,),
        grpc=False,
        default5=False,
        floor_iterations=500,
    ),
}


def say(line: str) -> None:
    progress(NAME, line)


def measure_floor(config: Path, zoo: Path, iterations: int) -> dict[str, Any]:
    """Per-request latency of the config's members run back to back at batch 1 in-process,
    with the gateway's own session options: what no server can go below."""
    from ensemble.config import load_config
    from ensemble.replicas.onnx import load_session

    cfg = load_config(config)
    members = cfg.ensembles[0].members
    sessions = [load_session(cfg.resolve(m.model)) for m in members]
    x = np.load(zoo / "test.npz")["X"][:1].astype(np.float32)
    feeds = [({s.get_inputs()[0].name: x}, ["probabilities"]) for s in sessions]
    for _ in range(max(100, iterations // 10)):
        for session, (feed, out) in zip(sessions, feeds, strict=True):
            session.run(out, feed)
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        for session, (feed, out) in zip(sessions, feeds, strict=True):
            session.run(out, feed)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {
        "members": [m.name for m in members],
        "iterations": iterations,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


@dataclass
class Target:
    """One system as the load generators see it."""

    name: str
    peer: Peer
    protocol: str  # "http" or "grpc"

    @property
    def address(self) -> tuple[str, int]:
        address = self.peer.grpc if self.protocol == "grpc" else self.peer.http
        assert address is not None
        return address


class Bench:
    """Runs the measurements of one plan against running peers and collects the rows."""

    def __init__(
        self, plan: Plan, peers: list[Peer], work: Path, grpc_procs: int, zoo: Path
    ) -> None:
        self.plan = plan
        self.peers = peers
        body, header_length = oip_http_body(zoo)
        self.http_headers = oip_http_headers(header_length)
        self.http_body = body
        self.script = write_script(work, "infer", body, self.http_headers)
        self.grpc_body = oip_grpc_body(zoo)
        self.grpc = GrpcLoad(grpc_procs) if plan.grpc else None

    def close(self) -> None:
        if self.grpc is not None:
            self.grpc.close()

    def _cpu_window(
        self, target: Target, run: Callable[[], WrkResult | LoadResult]
    ) -> tuple[WrkResult | LoadResult, dict[str, float]]:
        """Run a measurement and account where the machine's CPU went meanwhile."""
        idle = [p for p in self.peers if p is not target.peer]
        server0, idle0 = target.peer.cpu_seconds(), sum(p.cpu_seconds() for p in idle)
        loop0 = target.peer.main_thread_cpu_seconds()
        machine0, wall0 = machine_busy_seconds(), time.time()
        result = run()
        wall = time.time() - wall0
        server = (target.peer.cpu_seconds() - server0) / wall
        loop = (target.peer.main_thread_cpu_seconds() - loop0) / wall
        idle_peers = (sum(p.cpu_seconds() for p in idle) - idle0) / wall
        machine = (machine_busy_seconds() - machine0) / wall
        generator = result.generator_cpu_s / wall
        cpu = {
            "server_cores": round(server, 3),
            # Of those, the server's main thread: the event loop that bounds one process.
            "server_loop_cores": round(loop, 3),
            "generator_cores": round(generator, 3),
            # The other peers while they wait their turn (Ray's background work shows here).
            "idle_peers_cores": round(idle_peers, 3),
            # Whatever else ran: this process, other users of the machine.
            "other_cores": round(max(0.0, machine - server - generator - idle_peers), 3),
        }
        return result, cpu

    def closed(self, target: Target, concurrency: int) -> dict[str, Any]:
        plan = self.plan
        host, port = target.address
        if target.protocol == "http":
            url = f"http://{host}:{port}{INFER_PATH}"
            run_wrk(url, self.script, concurrency, plan.warmup_s).check(f"{target.name} warm-up")

            def run() -> WrkResult | LoadResult:
                return run_wrk(url, self.script, concurrency, plan.duration_s)
        else:
            grpc = self.grpc
            assert grpc is not None
            addr = f"{host}:{port}"
            grpc.run(addr, self.grpc_body, concurrency, 0, plan.warmup_s)

            def run() -> WrkResult | LoadResult:
                return grpc.run(addr, self.grpc_body, concurrency, 0, plan.duration_s)

        before = report.session_runs(target.peer)
        result, cpu = self._cpu_window(target, run)
        _check(target.name, concurrency, result)
        row = report.row(result, cpu)
        after = report.session_runs(target.peer)
        if before is not None and after is not None and after[1] > before[1]:
            # How well the in-process engine batched: member calls per onnxruntime run.
            row["calls_per_run"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
        return row

    def open(self, target: Target, rate: float) -> dict[str, Any]:
        host, port = target.address
        raw = encode_request(
            "POST", f"{host}:{port}", INFER_PATH, self.http_body, self.http_headers
        )

        def run() -> LoadResult:
            return run_open_loop(host, port, raw, rate, self.plan.warmup_s, self.plan.duration_s)

        result, cpu = self._cpu_window(target, run)
        _check(target.name, f"{rate:g} req/s", result)
        return report.row(result, cpu)


def _check(name: str, where: object, result: WrkResult | LoadResult) -> None:
    if isinstance(result, WrkResult):
        result.check(f"{name} at {where}")
    elif result.errors:
        raise WrkError(
            f"{name} at {where}: {result.errors} failed requests ({result.error_sample})"
        )


def stack_config(config: Path, grpc_stack: str, work: Path) -> Path:
    """``config`` as is, or a copy in ``work`` whose gateway serves gRPC on ``grpc_stack``
    (model paths made absolute, since they are relative to the file)."""
    if grpc_stack == "grpcio":
        return config
    doc = yaml.safe_load(config.read_text())
    for ensemble in doc["ensembles"]:
        for member in ensemble["members"]:
            member["model"] = str((config.parent / member["model"]).resolve())
    doc["model_zoo"]["dir"] = str((config.parent / doc["model_zoo"]["dir"]).resolve())
    doc.setdefault("server", {})["grpc_stack"] = grpc_stack
    copy = work / f"{config.stem}-{grpc_stack}.yaml"
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    return copy


def start_peers(
    plan: Plan, logs: Path, baseline: Path | None = None, config: Path = BENCH_CONFIG
) -> dict[str, Peer]:
    """Start the local peers at once, then wait for each ready line (Ray Serve is started later,
    for its own turns: ``start_ray``). The gateways serve ``config``."""
    serve = ["-m", "ensemble.cli", "serve"]
    ports = ["--http-port", "0", "--grpc-port", "0"]
    pending = [spawn("gateway", [*serve, str(config), *ports], logs)]
    if plan.workers > 1:
        workers = ["--workers", str(plan.workers)]
        name = workers_peer(plan)
        pending.append(spawn(name, [*serve, str(config), *ports, *workers], logs))
    if baseline is not None:  # its `ensemble` package first: not this tree's (PYTHONSAFEPATH)
        env = {"PYTHONPATH": str(baseline.resolve()), "PYTHONSAFEPATH": "1"}
        # Its own copy of the config and so its own zoo: model cards change between versions.
        config = baseline / BENCH_CONFIG.relative_to(ROOT)
        pending.append(spawn("baseline", [*serve, str(config), *ports], logs, env))
    if plan.default5:
        pending.append(spawn("gateway5", [*serve, str(DEFAULT_CONFIG), *ports], logs))
    pending.append(spawn("noop", ["-m", "loadtest.peers.noop"], logs))
    return _ready(pending)


def start_ray(logs: Path) -> Peer:
    """The Ray Serve peer, once ready."""
    # Ray starts its workers at nice 15 by default; other processes (the load generator,
    # anyone else on the machine) would then take the CPU from its replicas first.
    env = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}
    args = ["-m", "loadtest.peers.ray_app", str(BENCH_CONFIG), "--port", str(free_port())]
    return _ready([spawn("ray", args, logs, env)])["ray"]


def _ready(pending: list[PendingPeer]) -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    try:
        for p in pending:
            peers[p.name] = p.wait_ready(timeout_s=180 if p.name == "ray" else 90)
            say(f"{p.name} ready at {peers[p.name].http[0]}:{peers[p.name].http[1]}")
    except BaseException:
        stop_peers(peers)
        for p in pending:
            if p.name not in peers and p.proc.poll() is None:
                p.proc.kill()
        raise
    return peers


def stop_peers(peers: dict[str, Peer]) -> dict[str, int]:
    codes = {}
    for name, peer in peers.items():
        codes[name] = peer.stop()
        if codes[name] != 0:
            say(f"{name} exited {codes[name]}; log tail:\n{peer.log_tail()}")
    return codes


def targets(peers: dict[str, Peer], plan: Plan) -> list[Target]:
    """The interleaving order at each concurrency."""
    order = [("noop-http", "noop", "http")]
    if plan.grpc:
        order.append(("noop-grpc", "noop", "grpc"))
    for peer in ("gateway", workers_peer(plan), "baseline"):
        order.append((f"{peer}-http", peer, "http"))
        if plan.grpc:
            order.append((f"{peer}-grpc", peer, "grpc"))
    order.append(("gateway5-http", "gateway5", "http"))
    return [Target(name, peers[peer], proto) for name, peer, proto in order if peer in peers]


def workers_peer(plan: Plan) -> str:
    """The name of the gateway of several workers (its rows: NAME-http, NAME-grpc)."""
    return f"gateway{plan.workers}w"


@dataclass(frozen=True)
class Settings:
    """What one invocation measures: the plan, and where."""

    plan: Plan
    out: Path | None = None
    grpc_procs: int = 2
    ray: bool = True
    baseline: Path | None = None
    """A source tree (e.g. a `git worktree` of an earlier commit) whose gateway is measured
    beside this one, as baseline-http and baseline-grpc."""
    grpc_stack: str = "grpcio"
    """What serves the gateways' gRPC (``server.grpc_stack``)."""


def measure_all(bench: Bench, systems: list[Target], doc: dict[str, Any]) -> None:
    """Every closed-loop level and open-loop rate, the systems taking turns; rows into doc
    (beside those of earlier calls)."""
    plan = bench.plan
    closed: dict[str, dict[str, Any]] = doc.setdefault("closed_loop", {})
    closed.update({t.name: {} for t in systems})
    for c in plan.concurrency:
        for target in systems:
            report.settle(target.peer)
            row = bench.closed(target, c)
            closed[target.name][str(c)] = row
            say(f"closed c={c:<3} {target.name:<14} {report.brief(row)}")
    opened: dict[str, dict[str, Any]] = doc.setdefault("open_loop", {})
    for rate in plan.rates:
        for target in systems:
            skipped = ("gateway5", "baseline", workers_peer(plan))
            if target.protocol != "http" or target.peer.name in skipped:
                continue
            capacity = max(r["rps"] for r in closed[target.name].values())
            if rate > capacity:
                # Past its capacity an open-loop queue only grows: no steady state to
                # measure, just a backlog that would delay the next system's turn.
                row = {"skipped": f"offered rate above closed-loop capacity {capacity}"}
                opened.setdefault(target.name, {})[f"{rate:g}"] = row
                say(f"open {rate:>5g}/s {target.name:<14} skipped: {row['skipped']}")
                continue
            report.settle(target.peer)
            row = bench.open(target, rate)
            opened.setdefault(target.name, {})[f"{rate:g}"] = row
            say(f"open {rate:>5g}/s {target.name:<14} {report.brief(row)}")


def run(settings: Settings, command: str = "") -> Report:
    from ensemble.models import ensure_zoo

    wrk_binary()
    plan = settings.plan
    this = Run(NAME, settings.out, command)
    (this.out / "logs").mkdir(parents=True, exist_ok=True)
    zoo = ROOT / "models" / "digits"
    ensure_zoo(zoo)
    busy = report.busy_cores(1.0)
    this.machine.update(versions=report.versions(), busy_cores_before_start=busy)
    if busy > 0.3:
        say(f"warning: {busy:.2f} cores already busy before start; results will be noisy")
    doc: dict[str, Any] = {
        "plan": {k: v for k, v in asdict(plan).items() if k != "rates"}
        | {"open_loop_rates": list(plan.rates)},
        "generators": report.GENERATORS,
    }
    doc["plan"]["grpc_stack"] = settings.grpc_stack
    config = stack_config(BENCH_CONFIG, settings.grpc_stack, this.out / "logs")
    peers = start_peers(plan, this.out / "logs", settings.baseline, config)
    bench: Bench | None = None
    try:
        report.check_answers(peers, INFER_PATH, *oip_http_body(zoo))
        with tempfile.TemporaryDirectory(prefix="bench-") as work:
            bench = Bench(plan, list(peers.values()), Path(work), settings.grpc_procs, zoo)
            say("floor: onnxruntime in-process, members back to back at batch 1")
            doc["floor"] = measure_floor(BENCH_CONFIG, zoo, plan.floor_iterations)
            if plan.default5:
                doc["floor_default5"] = measure_floor(DEFAULT_CONFIG, zoo, plan.floor_iterations)
            measure_all(bench, targets(peers, plan), doc)
            if settings.ray:
                # Ray Serve runs only for its own turns: its dozen processes keep ~0.14 cores
                # busy while idle, which the other systems would otherwise lose.
                peers["ray"] = start_ray(this.out / "logs")
                bench.peers.append(peers["ray"])
                report.check_answers(peers, INFER_PATH, *oip_http_body(zoo))
                measure_all(bench, [Target("ray-http", peers["ray"], "http")], doc)
    finally:
        if bench is not None:
            bench.close()
        doc["exit_codes"] = stop_peers(peers)
    result: Report = {**this.header(), **doc}
    report.finish(result)
    return write_report(this.out, result, report.render_markdown(result))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(
        parser,
        NAME,
        quick="1 s warm-up + 2 s per measurement, under three minutes in all (default: a full "
        "run, 2 s + 10 s per measurement, about eight minutes)",
        seed=False,
        quiet=False,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for the integration test: c=1,32, HTTP only, 1 s each",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", help="override the levels")
    parser.add_argument("--duration", type=int, help="override seconds per measurement")
    parser.add_argument("--rates", type=float, nargs="+", help="override open-loop req/s")
    parser.add_argument(
        "--grpc-procs", type=int, default=2, help="gRPC generator processes (default: 2)"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve peer")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the second gateway (`ensemble serve --workers N`), measured "
        "beside the one-process gateway (default: 2; 1 leaves it out)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the gateway of the source tree DIR (e.g. `git worktree add DIR "
        "COMMIT`), run by this interpreter, as baseline-http and baseline-grpc, in turn with "
        "this one; the report compares throughput and CPU per request",
    )
    parser.add_argument(
        "--grpc-stack",
        choices=("grpcio", "uvicorn"),
        default="grpcio",
        help="what serves the gateways' gRPC (config server.grpc_stack; default: grpcio)",
    )
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "ensemble" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no ensemble package there")
    if args.quick and args.smoke:
        parser.error("--quick and --smoke are two different plans: give one")
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.concurrency:
        plan = replace(plan, concurrency=tuple(args.concurrency))
    if args.duration:
        plan = replace(plan, duration_s=args.duration)
    if args.rates:
        plan = replace(plan, rates=tuple(args.rates))
    if args.workers is not None:
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        plan = replace(plan, workers=args.workers)
    return Settings(
        plan, args.out, args.grpc_procs, not args.no_ray, args.baseline, args.grpc_stack
    )


DRIVER = Driver(NAME, parse_args, run, report.table, failures=(WrkError, report.AnswerMismatch))


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
