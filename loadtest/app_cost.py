"""CPU per request of the gateway's own code, with no sockets and no HTTP server around it.

    python -m loadtest.app_cost [CONFIG] [--model NAME] [--requests N] [--rounds R]
                                [--concurrency C]

Builds the gateway of CONFIG (default: the benchmark's three-member ensemble) in this process and
calls its OIP REST application directly (ASGI, as uvicorn would) with the benchmark's binary
request body, addressed to model NAME (default: the benchmark's ensemble, `digits`; a member's name
measures a member addressed directly): C concurrent callers, R rounds of N requests each. Prints
the CPU time this process used per request in each round (the event loop and onnxruntime's threads
together): the minimum, the 25th percentile and the median. On a shared machine whose speed moves
between runs, the minimum of many short rounds is the steadiest reading of what a change to the
request path costs: compare two source trees by running this command on each, one after the other,
a few times (`PYTHONSAFEPATH=1 PYTHONPATH=TREE python -m loadtest.app_cost`: without
PYTHONSAFEPATH, `-m` puts the current directory first and its tree wins). It prints the tree it
measured. Exit 1 when a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import uvloop

import ensemble
from loadtest.bench import BENCH_CONFIG
from loadtest.bench_clients import oip_http_body, oip_http_headers
from loadtest.experiment import ROOT


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def measure(
    config: Path, requests: int, rounds: int, concurrency: int, model: str = "digits"
) -> list[float]:
    """CPU seconds per request in each round (after a warm-up round); raises on a failure."""
    from ensemble.config import load_config
    from ensemble.server import Gateway

    gateway = Gateway.from_config(load_config(config))
    await gateway.start("127.0.0.1", None, 0)  # no HTTP listener: the app is called directly
    app = gateway.http_app
    assert app is not None
    body, header_length = oip_http_body(ROOT / "models" / "digits")
    sent_headers = {
        "Host": "gateway",
        **oip_http_headers(header_length),
        "Content-Length": str(len(body)),
    }
    # As ASGI hands them over: lower-case names, bytes.
    headers = [(k.lower().encode(), v.encode()) for k, v in sent_headers.items()]
    scope = _scope(f"/v2/models/{model}/infer", headers)
    statuses: Counter[int] = Counter()

    async def one() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:  # the app never reads past the body; a disconnect if it did
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] += 1

        await app(scope, receive, send)

    async def caller(count: int) -> None:
        for _ in range(count):
            await one()

    per_caller = max(1, requests // concurrency)
    readings: list[float] = []
    try:
        for index in range(rounds + 1):  # round 0 warms up
            statuses.clear()
            started = time.process_time()
            await asyncio.gather(*(caller(per_caller) for _ in range(concurrency)))
            used = time.process_time() - started
            if set(statuses) != {200}:
                raise RuntimeError(f"requests failed: statuses {dict(statuses)}")
            if index:
                readings.append(used / statuses.total())
    finally:
        await gateway.stop()
    return readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.app_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", type=Path, default=BENCH_CONFIG, help="gateway config")
    parser.add_argument(
        "--model", default="digits", help="the model requests ask (default: digits)"
    )
    parser.add_argument("--requests", type=int, default=2000, help="per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds measured (default 15)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent callers (default 32)"
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.concurrency) < 1:
        parser.error("--requests, --rounds and --concurrency must be at least 1")
    try:
        readings = uvloop.run(
            measure(args.config, args.requests, args.rounds, args.concurrency, args.model)
        )
    except RuntimeError as exc:
        print(f"app_cost: {exc}", file=sys.stderr)
        return 1
    us = sorted(r * 1e6 for r in readings)
    print(f"gateway code: {Path(ensemble.__file__).parent.parent}")
    print(
        f"CPU per request (us) of {args.model} over {len(us)} rounds of {args.requests} at "
        f"concurrency {args.concurrency}: min {us[0]:.1f}, p25 {us[len(us) // 4]:.1f}, "
        f"median {us[len(us) // 2]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
