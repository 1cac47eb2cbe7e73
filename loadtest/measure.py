"""Measuring a system during an experiment: its /metrics, a scenario's load, CPU by whom."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from loadtest.faults import Mark, ReplicaControl
    from loadtest.runner import GeneratorResult
    from loadtest.scenario import Scenario

Sample = tuple[str, tuple[tuple[str, str], ...]]
"""A Prometheus sample's name and sorted labels."""
Samples = dict[Sample, float]
T = TypeVar("T")


async def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    """Every sample of a server's /metrics, by name and labels (with the harness's client)."""
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
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def delta(before: Mapping[Sample, float], after: Mapping[Sample, float]) -> Samples:
    """Counter increases between two scrapes (samples that did not move are left out)."""
    out = {}
    for key, value in after.items():
        change = value - before.get(key, 0.0)
        if change:
            out[key] = change
    return out


def named(samples: Mapping[Sample, float], name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric: (labels, value) pairs."""
    return [(dict(labels), v) for (n, labels), v in samples.items() if n == name]


def total(samples: Mapping[Sample, float], name: str, **match: str) -> float:
    """One metric summed over the samples whose labels match ``match``."""
    return sum(
        v for labels, v in named(samples, name) if all(labels.get(k) == w for k, w in match.items())
    )


async def while_running(
    url: str, stop: asyncio.Event, every_s: float, read: Callable[[float, Samples], T]
) -> list[T]:
    """``read(time.monotonic(), /metrics)`` every ``every_s`` seconds until ``stop`` is set
    (run it beside a scenario's load), in order."""
    readings: list[T] = []
    while not stop.is_set():
        samples = await scrape(url)
        readings.append(read(time.monotonic(), samples))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return readings


async def drive_watched(
    sc: Scenario,
    url: str,
    data: Path,
    quiet: bool,
    every_s: float,
    read: Callable[[float, Samples], T],
) -> tuple[GeneratorResult, list[Mark], list[T]]:
    """``drive`` a scenario while reading /metrics with ``while_running``."""
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(while_running(url, stop, every_s, read))
    try:
        result, marks = await drive(sc, url, data, quiet)
    finally:
        stop.set()
    return result, marks, await watcher


# --- a scenario's load -------------------------------------------------------------------------


async def drive(
    sc: Scenario,
    url: str,
    data: Path,
    quiet: bool,
    *,
    pid: int | None = None,
    replicas: Mapping[str, ReplicaControl] | None = None,
) -> tuple[GeneratorResult, list[Mark]]:
    """Run one scenario's load (and its faults) through the harness against ``url``; Ctrl-C
    during it raises KeyboardInterrupt once the answers in flight are in."""
    from loadtest.fleet import Job
    from loadtest.harness import execute
    from loadtest.shapes import schedule_duration

    job = Job(sc, url, None, data, None)
    result, marks, interrupted = await execute(
        job, pid, schedule_duration(sc.load), quiet, replicas
    )
    if interrupted:
        raise KeyboardInterrupt
    return result, marks


def harness_report(
    sc: Scenario,
    result: GeneratorResult,
    out: Path,
    *,
    url: str,
    source: str,
    started: dt.datetime,
    marks: Sequence[Mark] = (),
    gateway_exit_code: int | None = None,
) -> dict[str, Any]:
    """The harness's own report of one run, written to OUT/report.json and report.md."""
    from loadtest.report import RunInfo, build_report, write_report

    stamp = started.isoformat(timespec="seconds")
    harness_started = gateway_exit_code is not None
    name = sc.name or source
    info = RunInfo(name, source, stamp, url, None, harness_started, gateway_exit_code, list(marks))
    report = build_report(sc, result, info)
    write_report(report, out)
    return report


def slo_attainment(result: GeneratorResult, slo_ms: float) -> tuple[float | None, int]:
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


# --- CPU ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuReading:
    """Seconds so far: wall clock, the system under test's CPU (a process tree), this
    process's CPU, and the machine's busy and stolen CPU."""

    wall: float
    system: float
    own: float
    busy: float
    steal: float

    @classmethod
    def now(cls, pid: int | None) -> CpuReading:
        from loadtest.fleet import cpu_seconds
        from loadtest.peers import machine_busy_seconds, machine_steal_seconds, tree_cpu_seconds

        system = tree_cpu_seconds(pid) if pid is not None else 0.0
        return cls(
            time.monotonic(),
            system,
            cpu_seconds(),
            machine_busy_seconds(),
            machine_steal_seconds(),
        )

    @classmethod
    def of_tree(cls) -> CpuReading:
        """With this process's whole tree (its children included) as the system."""
        return cls.now(os.getpid())


def cores(
    before: CpuReading, after: CpuReading, *, own_in_system: bool = False
) -> dict[str, float]:
    """Cores used between two readings: by the system, by this process (the generator), by
    every other process, and taken by the hypervisor (steal: busy, but no process here)."""
    wall = max(after.wall - before.wall, 1e-9)
    system = (after.system - before.system) / wall
    own = (after.own - before.own) / wall
    steal = (after.steal - before.steal) / wall
    ours = system if own_in_system else system + own
    others = max(0.0, (after.busy - before.busy) / wall - ours - steal)
    return {
        "system": round(system, 3),
        "generator": round(own, 3),
        "others": round(others, 3),
        "steal": round(steal, 3),
    }
