"""CPU per call of the server stacks themselves, HTTP and gRPC, as the load on them varies.

    python -m loadtest.stack_cost [--concurrency C ...] [--handler-cpu-us US] [--pythonpath DIR]

Runs the no-op OIP server (loadtest.peers.noop: the gateway's stack, uvicorn and httptools for
HTTP, stock or with the gateway's HTTP protocol, and, for gRPC, grpc.aio or the gateway's gRPC
on uvicorn's HTTP/2 (``grpc_stack: uvicorn``), on one uvloop event loop, answering a fixed
response) and drives it
closed-loop at each concurrency, wrk over HTTP and the benchmark's grpc.aio generator processes
over gRPC, printing throughput and the server's CPU time per call: what each protocol costs a
server before it does any work. Two things move that cost, and each has an option:

* ``--handler-cpu-us US``: each call first keeps the server's event loop busy for US
  microseconds, as a real server's work would; the CPU per call beyond US is then what the
  stack costs around a busy loop (a gateway's), not around an idle one.
* ``--pythonpath DIR`` (repeatable): the gRPC measurement again with DIR first on the server's
  ``PYTHONPATH``, e.g. another grpcio release installed there with
  ``pip install --no-deps --target DIR grpcio==VERSION``; rows are named by the grpcio they ran.

At each concurrency the servers take turns; each number is the minimum over ``--rounds`` runs
(on a shared machine whose speed moves, the steadiest reading). Needs ``wrk``. Exit 1 when a
call failed, 2 when a server did not start.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from loadtest.bench import INFER_PATH
from loadtest.bench_clients import GrpcLoad, oip_grpc_body, oip_http_body, oip_http_headers
from loadtest.experiment import ROOT, progress
from loadtest.peers import Peer, PeerError, spawn
from loadtest.wrk import WrkMissing, run_wrk, write_script, wrk_binary

NAME = "stack_cost"


@dataclass
class Server:
    """One no-op server, what it is measured over, and the environment that selects its grpcio
    (or the flags that select the uvicorn gRPC stack)."""

    label: str
    protocol: str  # "http" or "grpc"
    env: dict[str, str]
    peer: Peer | None = None
    args: tuple[str, ...] = ()


GATEWAY_STACKS = ("--grpc-stack", "uvicorn", "--http-stack", "gateway")
"""The no-op on the gateway's own protocols: its HTTP protocol and its gRPC on uvicorn."""


def grpcio_version(env: dict[str, str]) -> str:
    """The grpcio release a server started with ``env`` imports."""
    out = subprocess.run(
        [sys.executable, "-c", "import grpc; print(grpc.__version__)"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def servers(pythonpaths: list[Path]) -> list[Server]:
    found = [
        Server("http (uvicorn, httptools)", "http", {}),
        # The gateway's HTTP protocol: uvicorn's with connection limits and coalesced writes.
        Server("http (the gateway's protocol)", "http", {}, args=GATEWAY_STACKS),
        Server(f"grpc (grpcio {grpcio_version({})})", "grpc", {}),
        # The gateway's own gRPC on uvicorn's HTTP/2 (`server.grpc_stack: uvicorn`).
        Server(f"grpc (uvicorn, zttp {version('zttp')})", "grpc", {}, args=GATEWAY_STACKS),
    ]
    for path in pythonpaths:
        env = {"PYTHONPATH": str(path.resolve())}
        found.append(Server(f"grpc (grpcio {grpcio_version(env)}, {path})", "grpc", env))
    return found


class Driver:
    """Closed-loop runs against one server: wrk for HTTP, grpc.aio processes for gRPC."""

    def __init__(self, work: Path, grpc_procs: int) -> None:
        zoo = ROOT / "models" / "digits"
        body, header_length = oip_http_body(zoo)
        self.script = write_script(work, "infer", body, oip_http_headers(header_length))
        self.grpc_body = oip_grpc_body(zoo)
        self.grpc = GrpcLoad(grpc_procs)

    def close(self) -> None:
        self.grpc.close()

    def _run(self, server: Server, concurrency: int, seconds: float) -> tuple[int, float]:
        """(calls answered, calls per second) of one run."""
        peer = server.peer
        assert peer is not None
        if server.protocol == "http":
            url = f"http://{peer.http[0]}:{peer.http[1]}{INFER_PATH}"
            result = run_wrk(url, self.script, concurrency, max(1, math.ceil(seconds)))
            result.check(server.label)
            return result.requests, result.rps
        assert peer.grpc is not None
        target = f"{peer.grpc[0]}:{peer.grpc[1]}"
        loaded = self.grpc.run(target, self.grpc_body, concurrency, 0.0, seconds)
        if loaded.errors:
            raise RuntimeError(f"{loaded.errors} failed calls ({loaded.error_sample})")
        return loaded.requests, loaded.rps

    def measure(self, server: Server, concurrency: int, seconds: float) -> tuple[float, float]:
        """(calls per second, server CPU microseconds per call), after a 1 s warm-up."""
        assert server.peer is not None
        self._run(server, concurrency, 1.0)
        before = server.peer.cpu_seconds()
        calls, rate = self._run(server, concurrency, seconds)
        used = server.peer.cpu_seconds() - before
        if not calls:
            raise RuntimeError(f"{server.label}: no call answered at concurrency {concurrency}")
        return rate, used / calls * 1e6


def _table(rows: list[tuple[str, int, float, float]], out: Callable[[str], None]) -> None:
    out(f"{'server':<48} {'c':>4} {'calls/s':>9} {'CPU us/call':>12}")
    for label, level, rate, cpu in rows:
        out(f"{label:<48} {level:>4} {rate:>9.0f} {cpu:>12.1f}")


def run(args: argparse.Namespace) -> int:
    found = servers(args.pythonpath)
    extra = ["--handler-cpu-us", str(args.handler_cpu_us)]
    with tempfile.TemporaryDirectory(prefix="stack-cost-") as work:
        driver = Driver(Path(work), args.grpc_procs)
        peers: dict[tuple[object, ...], Peer] = {}
        try:
            # One server per environment and flags, answering both protocols.
            for server in found:
                key = (tuple(sorted(server.env.items())), server.args)
                if key not in peers:
                    args_ = ["-m", "loadtest.peers.noop", *extra, *server.args]
                    pending = spawn(f"noop{len(peers)}", args_, Path(work), server.env)
                    peers[key] = pending.wait_ready(timeout_s=60)
                server.peer = peers[key]
            rows = []
            for level in args.concurrency:
                best: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for server in found:
                        rate, cpu = driver.measure(server, level, args.duration)
                        line = f"c={level} {server.label}: {rate:.0f} calls/s, {cpu:.1f} us"
                        progress(NAME, line)
                        if server.label not in best or cpu < best[server.label][1]:
                            best[server.label] = (rate, cpu)
                rows += [(label, level, rate, cpu) for label, (rate, cpu) in best.items()]
            _table(rows, print)
        finally:
            driver.close()
            for peer in peers.values():
                peer.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.stack_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 32], help="levels (default 1 4 32)"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per level and server (3)")
    parser.add_argument(
        "--handler-cpu-us", type=float, default=0.0, help="loop time per call (default 0)"
    )
    parser.add_argument(
        "--pythonpath", type=Path, action="append", default=[], help="another grpcio to compare"
    )
    parser.add_argument("--grpc-procs", type=int, default=2, help="generator processes (2)")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.duration <= 0:
        parser.error("--concurrency and --rounds must be at least 1, --duration above 0")
    if args.handler_cpu_us < 0:
        parser.error("--handler-cpu-us must be at least 0")
    try:
        wrk_binary()
        return run(args)
    except (PeerError, WrkMissing) as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
