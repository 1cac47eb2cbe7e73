"""CPU per request across a gateway's whole process tree (Ray's processes included).

    python -m loadtest.cpu_cost CONFIG [--requests N] [--concurrency C]

Starts `ensemble serve CONFIG` on free ports, sends N requests (one `digits` test row each,
OIP JSON) from C client threads in this process, and prints the requests per second, the p50
latency and the CPU seconds each process of the gateway's tree used per request (from
/proc/PID/stat, so children such as Ray's raylet, GCS and Serve replicas count too). The
client's own CPU is not counted. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.gateway import start_gateway, stop_gateway

CLOCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        found += [int(k) for k in kids]
    return found


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of ``root`` and its descendants, by pid."""
    cpu: dict[int, tuple[str, float]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            cpu[pid] = (name, (int(stat[11]) + int(stat[12])) / CLOCK)
            todo += _children(pid)
        except (OSError, IndexError):
            continue  # exited meanwhile
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cpu_cost", description=__doc__)
    parser.add_argument("config", type=Path, help="gateway config to serve")
    parser.add_argument("--requests", type=int, default=400, help="requests (default 400)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--model", default="digits", help="model to call (default digits)")
    parser.add_argument("--out", type=Path, default=Path("/tmp"), help="where the log goes")
    args = parser.parse_args(argv)
    if args.requests < args.concurrency or args.concurrency < 1:
        parser.error("--requests must be at least --concurrency, which must be at least 1")
    gateway = start_gateway(args.config, args.out / "cpu_cost-gateway.log", 180)
    try:
        url = f"{gateway.url}/v2/models/{args.model}/infer"
        x = np.load(Path(__file__).resolve().parents[1] / "models/digits/test.npz")["X"][:1]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "data": x.astype(np.float32).ravel().tolist(),
                }
            ]
        }
        time.sleep(2)  # let start-up work settle
        latencies: list[float] = []
        failures: list[str] = []

        def client(count: int) -> None:
            with httpx.Client(timeout=30) as http:
                for _ in range(count):
                    start = time.perf_counter()
                    answer = http.post(url, json=body)
                    latencies.append(time.perf_counter() - start)
                    if answer.status_code != 200:
                        failures.append(answer.text[:200])

        per = args.requests // args.concurrency
        threads = [threading.Thread(target=client, args=(per,)) for _ in range(args.concurrency)]
        before, started = tree_cpu(gateway.proc.pid), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed, after = time.perf_counter() - started, tree_cpu(gateway.proc.pid)
    finally:
        stop_gateway(gateway, 60)
    n = len(latencies)
    print(
        f"{args.config}: {n} requests at concurrency {args.concurrency} in {elapsed:.1f} s = "
        f"{n / elapsed:.1f} req/s, p50 {sorted(latencies)[n // 2] * 1e3:.1f} ms, "
        f"{len(failures)} failed"
    )
    used = {pid: t - before.get(pid, (name, 0.0))[1] for pid, (name, t) in after.items()}
    total = 0.0
    for pid, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
        total += seconds
        if seconds >= 0.05:
            print(f"  {after[pid][0]:<24} {seconds / n * 1e3:6.2f} ms CPU per request")
    print(f"  {'all processes':<24} {total / n * 1e3:6.2f} ms CPU per request")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
