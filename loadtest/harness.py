"""One scenario's run: the load, its fault events and a live progress line, together."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtest.faults import Mark, ReplicaControl
    from loadtest.fleet import Fleet, Job
    from loadtest.runner import GeneratorResult


def _say(line: str) -> None:
    print(f"loadtest: {line}", file=sys.stderr, flush=True)


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
    ``pid`` is the gateway's when the harness started it (for the process fault hooks);
    ``replicas`` are replica processes the caller started, for the replica fault hooks.
    Returns the result, the fault marks and whether the run was interrupted."""
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
