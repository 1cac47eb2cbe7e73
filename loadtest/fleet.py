"""Generator processes: split one scenario over a fleet of generators and merge their results."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.process
import os
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from loadtest.clients import InferClient, RequestShape, Workload, load_workload, make_client
from loadtest.runner import Clock, Generator, GeneratorResult, Histogram, Records, Snapshot
from loadtest.scenario import ClosedLoad, Scenario
from loadtest.shapes import arrival_times, plan, schedule_duration


@dataclass(frozen=True)
class Job:
    """Everything a generator process needs; picklable so other processes can run it."""

    scenario: Scenario
    url: str | None
    grpc: str | None
    data_path: Path
    trace: tuple[float, ...] | None


def share(total: int, index: int, count: int) -> int:
    """Generator ``index``'s part of ``total`` when split ``count`` ways."""
    return total // count + (1 if index < total % count else 0)


def build_generator(
    job: Job, index: int, count: int, clock: Clock = time.monotonic
) -> tuple[Generator, InferClient]:
    """The client and generator for share ``index`` of ``count`` of the job's load."""
    sc = job.scenario
    work: Workload = load_workload(job.data_path, sc.request.batch_size)
    shape = RequestShape(
        sc.model,
        sc.request.endpoint,
        sc.request.input,
        sc.request.output,
        sc.request.timeout_s,
        [c.parameters.as_dict() for c in sc.mix],
        feedback_share=sc.feedback.share if sc.feedback is not None else 0.0,
        seed=sc.seed * 1000 + index,
        feedback_token=os.environ.get(sc.feedback.token_env) if sc.feedback is not None else None,
    )
    client = make_client(sc.protocol, job.url, job.grpc, shape, work, sc.connections)
    weights = [c.weight for c in sc.mix]
    labels = [] if sc.request.endpoint == "live" else [work.labels(b) for b in range(work.batches)]
    closed: ClosedLoad | None = None
    if isinstance(sc.load, ClosedLoad):
        closed = sc.load.model_copy(
            update={"concurrency": share(sc.load.concurrency, index, count)}
        )
        rng = random.Random(sc.seed * 1000 + index)
        arrivals = plan(itertools.repeat(0.0), weights, work.batches, rng)
    else:
        # Every process plans the whole schedule from the same seed and keeps every count-th
        # arrival, so the merged load has exactly the planned shape.
        rng = random.Random(sc.seed)
        times = arrival_times(sc.load, rng, job.trace)
        arrivals = itertools.islice(plan(times, weights, work.batches, rng), index, None, count)
    gen = Generator(
        client,
        labels,
        arrivals=arrivals,
        closed=closed,
        duration_s=schedule_duration(sc.load, job.trace),
        max_requests=share(sc.limits.max_requests, index, count),
        drain_timeout_s=sc.limits.drain_timeout_s,
        clock=clock,
    )
    return gen, client


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TargetError(Exception):
    """The target cannot be load-tested (unreachable, model not ready, generator failed)."""


class LocalFleet:
    """One generator in this process, on this event loop."""

    def __init__(self, job: Job, index: int = 0, count: int = 1) -> None:
        self.gen, self.client = build_generator(job, index, count)

    async def start(self) -> None:
        await self.client.start()
        problem = await self.client.check()
        if problem is not None:
            await self.client.close()
            raise TargetError(problem)

    async def run(self, start_at: float) -> GeneratorResult:
        cpu = cpu_seconds()
        try:
            records = await self.gen.run(start_at)
        finally:
            await self.client.close()
        return GeneratorResult(
            records,
            dict(self.client.error_samples),
            self.client.queued(),
            cpu_seconds() - cpu,
            self.gen.send_window_s,
            dict(self.client.feedback),
        )

    def snapshot(self) -> Snapshot:
        return self.gen.snapshot()

    def stop(self) -> None:
        self.gen.stop()

    async def close(self) -> None:
        await self.client.close()


Message = tuple[str, object]


async def _receive(conn: Connection, timeout_s: float) -> Message:
    """The next message from a worker, without blocking the event loop while it is on its way."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        await asyncio.wait_for(ready, timeout_s)
    finally:
        loop.remove_reader(conn.fileno())
    # uvloop's add_reader leaves the pipe non-blocking, and a large message (a worker's
    # results) arrives in pieces: recv would raise BlockingIOError on the first gap.
    os.set_blocking(conn.fileno(), True)
    message: Message = conn.recv()
    return message


def _worker_main(job: Job, index: int, count: int, conn: Connection) -> None:
    """Entry point of a spawned generator process."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        uvloop.run(_worker(job, index, count, conn))
    except Exception:
        os.set_blocking(conn.fileno(), True)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


async def _worker(job: Job, index: int, count: int, conn: Connection) -> None:
    fleet = LocalFleet(job, index, count)
    try:
        await fleet.start()
    except TargetError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", None))
    kind, start_at = await _receive(conn, 600)
    assert kind == "start" and isinstance(start_at, float)
    run = asyncio.ensure_future(fleet.run(start_at))
    loop = asyncio.get_running_loop()

    def stop() -> None:  # the only message left to come is "stop" (or EOF: the parent is gone)
        loop.remove_reader(conn.fileno())
        fleet.stop()

    loop.add_reader(conn.fileno(), stop)
    while not run.done():
        await asyncio.wait({run}, timeout=0.25)
        conn.send(("progress", fleet.snapshot()))
    loop.remove_reader(conn.fileno())
    # add_reader left the pipe non-blocking: the results (megabytes after a long run) would
    # fill the pipe's buffer and raise BlockingIOError part-way instead of waiting for the parent.
    os.set_blocking(conn.fileno(), True)
    conn.send(("done", run.result()))


class ProcessFleet:
    """``count`` generator processes (spawned), each sending its share; results merged."""

    def __init__(self, job: Job, count: int) -> None:
        self.job = job
        self.count = count
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.snapshots = [Snapshot() for _ in range(count)]

    async def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked event loops or gRPC state
        for i in range(self.count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(self.job, i, self.count, child))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            kind, payload = await self._expect(conn, 120)
            if kind != "ready":
                await self.close()
                raise TargetError(str(payload))

    async def _expect(self, conn: Connection, timeout_s: float) -> Message:
        try:
            return await _receive(conn, timeout_s)
        except (TimeoutError, EOFError, OSError) as exc:
            return ("error", f"generator process failed: {exc!r}")

    async def run(self, start_at: float) -> GeneratorResult:
        for conn in self.conns:
            conn.send(("start", start_at))
        try:
            results = await asyncio.gather(*(self._collect(i) for i in range(self.count)))
        except BaseException:
            self.stop()  # one generator failed: the others stop too, and nobody is left behind
            await self.close()
            raise
        merged = Records()
        samples: dict[str, str] = {}
        feedback: dict[str, int] = {}
        for result in results:
            merged.extend(result.records)
            samples = {**result.error_samples, **samples}
            for kind, count in result.feedback.items():
                feedback[kind] = feedback.get(kind, 0) + count
        await self.close()
        return GeneratorResult(
            merged,
            samples,
            sum(r.queued for r in results),
            sum(r.cpu_s for r in results),
            max(r.send_window_s for r in results),
            feedback,
        )

    async def _collect(self, index: int) -> GeneratorResult:
        conn = self.conns[index]
        while True:
            # Bounded: a worker reports progress every 0.25 s while it runs.
            kind, payload = await self._expect(conn, 60)
            if kind == "progress":
                assert isinstance(payload, Snapshot)
                self.snapshots[index] = payload
            elif kind == "done":
                assert isinstance(payload, GeneratorResult)
                return payload
            else:
                raise TargetError(f"generator {index}: {payload}")

    def snapshot(self) -> Snapshot:
        total = Snapshot()
        hist = Histogram()
        for snap in self.snapshots:
            total.sent += snap.sent
            total.ok += snap.ok
            total.errors += snap.errors
            hist.merge(snap.hist)
        total.hist = hist.counts
        return total

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))

    async def close(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 10)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


Fleet = LocalFleet | ProcessFleet


def make_fleet(job: Job) -> Fleet:
    count = job.scenario.generators
    return LocalFleet(job) if count == 1 else ProcessFleet(job, count)
