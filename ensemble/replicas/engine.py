"""Runs onnxruntime calls, batching concurrent calls per session: small work on the event loop,
larger work on a bounded thread pool.

Calls that arrive while the pool is busy, or in the same event-loop tick, are grouped by
session and concatenated along the batch dimension into one ``session.run``: batching comes
from load itself, so an idle gateway adds no wait and a busy one amortises per-call overhead
(Clipper's adaptive batching without a timer). When a tick queued several calls of one session
(concurrent requests), the dispatch waits one more loop iteration: a request's calls are queued
in the iteration after its bytes arrived, so otherwise only requests read in one iteration batch
together and the requests in flight split into as many cohorts as a request spends iterations
in the gateway; with it, they join into one (at 32 concurrent requests 6 calls a run became
about 27, and the gateway's CPU per request fell by an eighth: `loadtest.bench --baseline`).

Work estimated under ``INLINE_MAX_S`` of CPU runs on the loop's own thread; larger work is
handed to threads in jobs of roughly equal estimated cost, so both cores of a small machine
stay busy and each request pays for few thread hand-offs instead of one per member.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ensemble.errors import EnsembleError, InvalidInput
from ensemble.replicas.onnx import OnnxSignature

Outputs = dict[str, np.ndarray]
SPLIT_MIN_S = 1e-3
"""Work estimated below this runs in one job rather than spread over threads."""
INLINE_MAX_S = 1e-3
"""Work estimated below this much CPU (by sessions that have timed enough runs) runs on the event
loop's own thread: a hand-off to a pool thread costs more CPU than such work. Measured on a
2-vCPU machine under load, a digits member's run took 4-6 times the CPU on a pool thread that
it took on the loop (77-199 us against 14-51 us), and the hand-off itself wakes two threads
and moves the GIL twice: with its work on the loop, the three-member benchmark ensemble used
0.78-0.93x the CPU per request over HTTP and 0.82-0.88x over gRPC
(docs/evidence/2026-12-06-engine-inline.md).
Larger work, and work of a session not timed yet, never blocks the loop for longer."""
LEARNED_RUNS = 8
"""Runs a session must have timed before its estimate can keep work on the loop."""


class SessionRunner:
    """One onnxruntime session and how to run it; learns its own cost per call and per row."""

    def __init__(self, session: ort.InferenceSession, signature: OnnxSignature) -> None:
        self.session = session
        self.output_names = tuple(o.name for o in signature.outputs)
        self.map_outputs = signature.map_outputs
        # Concatenating requests needs a variable first dimension on every input and output.
        self.batchable = all(
            spec.shape[:1] == (-1,) for spec in (*signature.inputs, *signature.outputs)
        )
        self.fixed_s = 50e-6
        self.per_row_s = 5e-6
        self.timed = 0
        """Runs timed so far (estimates are guesses before ``LEARNED_RUNS``)."""
        self.owner: tuple[str, str] | None = None
        """(member, tier) its calls' queue and compute time are reported under, if any."""

    def estimate_s(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        """Run synchronously (on a pool thread or the loop's); errors become the gateway's
        own."""
        names = list(outputs or self.output_names)
        # CPU time, not wall time: on a busy machine a run's wall time includes waiting for a
        # core and for the GIL, which would make small work look large.
        start = time.thread_time()
        try:
            values = self.session.run(names, dict(feed))
        except Exception as exc:
            # onnxruntime reports bad shapes/types as InvalidArgument; anything else is ours.
            if type(exc).__name__ in ("InvalidArgument", "InvalidGraph"):
                raise InvalidInput(f"the model rejected the input: {exc}") from exc
            raise EnsembleError(f"onnxruntime failed: {exc}") from exc
        self._learn(time.thread_time() - start, _rows(feed))
        result = dict(zip(names, values, strict=True))
        for name, classes in self.map_outputs.items():
            if name in result:  # ZipMap: a list of {class: probability} per row
                rows = result[name]
                result[name] = np.array([[row[c] for c in classes] for row in rows], np.float32)
        return result

    def _learn(self, elapsed_s: float, rows: int) -> None:
        # A rough split of the observed CPU time into a fixed and a per-row part, smoothed;
        # only used to keep small work on the loop and to balance the rest across threads, so
        # races between threads are harmless.
        self.timed += 1
        if rows <= 1:
            self.fixed_s += 0.2 * (elapsed_s - self.fixed_s)
        else:
            per_row = max(0.0, (elapsed_s - self.fixed_s) / rows)
            self.per_row_s += 0.2 * (per_row - self.per_row_s)


def _rows(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass(eq=False)
class _Call:
    runner: SessionRunner
    feed: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    future: asyncio.Future[Outputs]
    rows: int
    queued: float = 0.0
    """When it was submitted (``time.perf_counter``)."""


@dataclass(eq=False)
class _Batch:
    runner: SessionRunner
    outputs: tuple[str, ...]
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    started: float = 0.0
    """When its run began and ended (``time.perf_counter``; its calls share them)."""
    ended: float = 0.0

    def cost_s(self) -> float:
        return self.runner.estimate_s(self.rows)


def _signature_key(call: _Call) -> tuple[object, ...]:
    """Calls can share one run only with the same session, outputs and non-batch shapes."""
    shapes = tuple((k, v.shape[1:], v.dtype.str) for k, v in call.feed.items())
    return (id(call.runner), call.outputs, shapes)


def _run_batch(batch: _Batch) -> list[Outputs | BaseException]:
    """Run one batch (on a pool thread, or the loop's for small work); one result (or error)
    per call, in order; its start and end stamped on it. A batch whose every caller gave up
    while it waited behind earlier batches of its job is not run (reading a future's state from
    a pool thread is a plain read;
    a call cancelled just after it is run anyway, as any call cancelled mid-run is)."""
    if all(call.future.done() for call in batch.calls):
        return [_GAVE_UP] * len(batch.calls)
    batch.started = time.perf_counter()
    try:
        return _results(batch)
    finally:
        batch.ended = time.perf_counter()


_GAVE_UP = asyncio.CancelledError("every caller gave up before the run")


def _results(batch: _Batch) -> list[Outputs | BaseException]:
    calls = batch.calls
    if len(calls) == 1:
        try:
            return [batch.runner.run(calls[0].feed, batch.outputs)]
        except Exception as exc:
            return [exc]
    feed = {name: np.concatenate([c.feed[name] for c in calls]) for name in calls[0].feed}
    try:
        merged = batch.runner.run(feed, batch.outputs)
    except Exception:
        # One bad request must not fail its neighbours: retry each on its own.
        return [r for c in calls for r in _results(_Batch(batch.runner, batch.outputs, [c]))]
    results: list[Outputs | BaseException] = []
    offset = 0
    for call in calls:
        results.append({k: v[offset : offset + call.rows] for k, v in merged.items()})
        offset += call.rows
    return results


def _run_job(job: list[_Batch]) -> list[list[Outputs | BaseException]]:
    return [_run_batch(batch) for batch in job]


class InProcessEngine:
    """The bounded pool onnxruntime runs on; work that costs less than a hand-off to it
    (``INLINE_MAX_S``) runs on the event loop instead."""

    def __init__(self, threads: int, *, max_batch_rows: int = 256, batching: bool = True) -> None:
        self.threads = threads
        self.max_batch_rows = max_batch_rows
        self.batching = batching
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="onnxruntime")
        self._queue: list[_Call] = []
        self._busy = 0
        self._scheduled = False
        self.observe: Callable[[str, str, Sequence[float], float], None] | None = None
        """Told of each run of a session that has an owner (the gateway's metrics): (member,
        tier, each of its calls' seconds in the queue, the run's seconds)."""

    @property
    def queued(self) -> int:
        """Calls waiting for a thread (a load signal)."""
        return len(self._queue)

    def submit(
        self, runner: SessionRunner, feed: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> asyncio.Future[Outputs]:
        """Queue one call; the future resolves with its outputs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        call = _Call(runner, feed, tuple(outputs), future, _rows(feed), time.perf_counter())
        self._queue.append(call)
        if not self._scheduled:
            # Dispatch after the current tick, so calls made together are planned together.
            self._scheduled = True
            loop.call_soon(self._gather, loop)
        return future

    def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch now, or one loop iteration later when a session has several calls queued
        (requests arrive concurrently): the calls of requests read meanwhile join them."""
        queue = self._queue
        if len(queue) > len({id(call.runner) for call in queue}):
            loop.call_soon(self._dispatch)
        else:
            self._dispatch()

    def _batches(self, calls: list[_Call]) -> list[_Batch]:
        batches: list[_Batch] = []
        open_batches: dict[tuple[object, ...], _Batch] = {}
        for call in calls:
            if call.future.done():
                continue  # cancelled while queued (its request gave up)
            key = _signature_key(call)
            batch = open_batches.get(key) if self.batching and call.runner.batchable else None
            if batch is None or batch.rows + call.rows > self.max_batch_rows:
                batch = _Batch(call.runner, call.outputs)
                batches.append(batch)
                open_batches[key] = batch
            batch.calls.append(call)
            batch.rows += call.rows
        return batches

    def _dispatch(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        batches = self._batches(self._queue)
        total = sum(b.cost_s() for b in batches)
        if total < INLINE_MAX_S and all(b.runner.timed >= LEARNED_RUNS for b in batches):
            self._queue = []  # small: here and now, whether or not a thread is free
            self._finish(batches, _ran(batches), counted=False)
            return
        free = self.threads - self._busy
        if free <= 0:
            return  # the queue waits for a thread (``_finish`` dispatches again)
        self._queue = []
        # Largest first; each free thread gets about its share of the estimated cost, and the
        # last free one takes whatever is left, so nothing waits behind a whole job.
        batches.sort(key=_Batch.cost_s, reverse=True)
        share = total / self.threads
        loop = asyncio.get_running_loop()
        while batches and free > 0:
            # Two small onnxruntime runs in parallel were slower than back to back on a 2-vCPU
            # machine (measured: 1.17 ms vs 0.81 ms for the default ensemble), so small work
            # stays in one job and only big work is spread over threads.
            if free == 1 or total < SPLIT_MIN_S:
                job, batches = batches, []
            else:
                job, cost = [], 0.0
                while batches and cost < share:
                    job.append(batches.pop(0))
                    cost += job[-1].cost_s()
            free -= 1
            self._busy += 1
            done = loop.run_in_executor(self._pool, _run_job, job)
            done.add_done_callback(functools.partial(self._finish, job))

    def _finish(
        self,
        job: list[_Batch],
        done: asyncio.Future[list[list[Outputs | BaseException]]],
        counted: bool = True,
    ) -> None:
        if counted:  # it held a pool thread
            self._busy -= 1
        try:
            results = done.result()
        except BaseException as exc:  # the pool itself failed (shut down): fail the calls
            results = [[exc] * len(batch.calls) for batch in job]
        observe = self.observe
        for batch, batch_results in zip(job, results, strict=True):
            owner = batch.runner.owner
            if observe is not None and owner is not None and batch.ended:
                queues = [max(0.0, batch.started - call.queued) for call in batch.calls]
                observe(owner[0], owner[1], queues, batch.ended - batch.started)
            for call, result in zip(batch.calls, batch_results, strict=True):
                if call.future.done():
                    continue
                if isinstance(result, BaseException):
                    call.future.set_exception(result)
                else:
                    call.future.set_result(result)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _ran(job: list[_Batch]) -> asyncio.Future[list[list[Outputs | BaseException]]]:
    """``job`` run here and now, as the finished future a pool thread would have given."""
    done: asyncio.Future[list[list[Outputs | BaseException]]] = (
        asyncio.get_running_loop().create_future()
    )
    done.set_result(_run_job(job))
    return done
