"""The generator: sends the planned requests open- or closed-loop and records every outcome."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from loadtest.clients import InferClient
from loadtest.scenario import ClosedLoad
from loadtest.shapes import Arrival

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OK = "ok"
_BURST = 64  # sends in a row before yielding, so answers are read while catching up


@dataclass
class Records:
    """One row per request, in typed columns: cheap to append, pickle and hand to numpy."""

    intended: array[float] = field(default_factory=lambda: array("d"))
    """Intended send time, seconds after the start."""
    lag: array[float] = field(default_factory=lambda: array("d"))
    """Actual send minus intended send, seconds: the generator's own delay."""
    latency: array[float] = field(default_factory=lambda: array("d"))
    """Answer time minus *intended* send time, seconds (no coordinated omission)."""
    kind: array[int] = field(default_factory=lambda: array("b"))
    klass: array[int] = field(default_factory=lambda: array("b"))
    correct: array[int] = field(default_factory=lambda: array("h"))
    """Correctly labelled samples; -1 when the answer was not checked."""
    degraded: array[int] = field(default_factory=lambda: array("b"))
    """1 when the answer said `degraded` in its parameters (an answer, but not the full one)."""
    kinds: list[str] = field(default_factory=lambda: [OK])

    def code(self, kind: str) -> int:
        try:
            return self.kinds.index(kind)
        except ValueError:
            self.kinds.append(kind)
            return len(self.kinds) - 1

    def add(
        self,
        intended: float,
        lag: float,
        latency: float,
        kind: int,
        klass: int,
        ok: int,
        degraded: bool = False,
    ) -> None:
        self.intended.append(intended)
        self.lag.append(lag)
        self.latency.append(latency)
        self.kind.append(kind)
        self.klass.append(klass)
        self.correct.append(ok)
        self.degraded.append(degraded)

    def __len__(self) -> int:
        return len(self.intended)

    def extend(self, other: Records) -> None:
        self.intended.extend(other.intended)
        self.lag.extend(other.lag)
        self.latency.extend(other.latency)
        remap = [self.code(k) for k in other.kinds]
        self.kind.extend(array("b", (remap[k] for k in other.kind)))
        self.klass.extend(other.klass)
        self.correct.extend(other.correct)
        self.degraded.extend(other.degraded)


class Histogram:
    """Log-bucketed latency counts (2.5 % wide) for a running p99 that processes can merge."""

    PER_E = 40
    SIZE = 900  # 1 us .. ~5 min

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE

    def add(self, seconds: float) -> None:
        i = int(math.log(max(seconds * 1e6, 1.0)) * self.PER_E)
        self.counts[min(i, self.SIZE - 1)] += 1

    @classmethod
    def of(cls, counts: Sequence[int]) -> Histogram:
        hist = cls()
        hist.counts = list(counts)
        return hist

    def merge(self, counts: Sequence[int]) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]

    def quantile(self, q: float) -> float | None:
        total = sum(self.counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return math.exp((i + 1) / self.PER_E) / 1e6
        return None


@dataclass
class Snapshot:
    """Counters for the progress line."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * Histogram.SIZE)


@dataclass
class GeneratorResult:
    """What one generator (or the merged fleet) measured."""

    records: Records
    error_samples: dict[str, str]
    queued: int
    cpu_s: float
    send_window_s: float
    """Seconds from the start until sending ended (the schedule's end unless cut short)."""
    feedback: dict[str, int] = field(default_factory=dict)
    """Feedback posts by outcome (`sent`, `accepted`, error kinds); empty without feedback."""


class Generator:
    """Drives one client from one process; answers are callbacks, never one task per request."""

    def __init__(
        self,
        client: InferClient,
        labels: Sequence[Sequence[int]],
        *,
        arrivals: Iterator[Arrival],
        closed: ClosedLoad | None,
        duration_s: float,
        max_requests: int,
        drain_timeout_s: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.client = client
        self.labels = labels
        self.arrivals = arrivals
        self.closed = closed
        self.duration_s = duration_s
        self.send_window_s = 0.0
        self.max_requests = max_requests
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.records = Records()
        self.hist = Histogram()
        self.sent = self.ok = self.errors = 0
        self._inflight: dict[int, tuple[float, float, int]] = {}
        self._idle = asyncio.Event()
        self._start = 0.0
        self._stopping = False
        self._sending: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Stop sending (Ctrl-C); answers still in flight are awaited as usual."""
        self._stopping = True
        if self._sending is not None and self.closed is None:
            self._sending.cancel()  # may sit in a long gap between arrivals

    def snapshot(self) -> Snapshot:
        return Snapshot(self.sent, self.ok, self.errors, list(self.hist.counts))

    async def run(self, start_at: float) -> Records:
        """Send from ``start_at`` (a clock value) on, then await answers up to the drain timeout."""
        self._start = start_at
        now = self.clock()
        if start_at > now:
            await self.sleep(start_at - now)
        sending = self._open_loop() if self.closed is None else self._closed_loop(self.closed)
        self._sending = asyncio.ensure_future(sending)
        if self._stopping:
            self._sending.cancel()
        try:
            await self._sending
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        cut = self._stopping or self.sent >= self.max_requests
        self.send_window_s = self.clock() - start_at if cut else self.duration_s
        if self._inflight:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
        unfinished = self.records.code("unfinished")
        end = self.clock()
        for intended, lag, klass in self._inflight.values():
            self.records.add(intended - start_at, lag, end - intended, unfinished, klass, 0)
        self.errors += len(self._inflight)
        self._inflight.clear()
        return self.records

    async def _open_loop(self) -> None:
        burst = 0
        for arrival in self.arrivals:
            if self.sent >= self.max_requests:
                return
            due = self._start + arrival.t
            now = self.clock()
            if due > now:
                burst = 0
                await self.sleep(due - now)
                now = self.clock()
            elif burst >= _BURST:
                burst = 0
                await asyncio.sleep(0)
                now = self.clock()
            burst += 1
            self._send(arrival, due, now, None)

    async def _closed_loop(self, load: ClosedLoad) -> None:
        end = self._start + load.duration_s
        done = asyncio.Event()
        workers = load.concurrency
        loop = asyncio.get_running_loop()

        def next_request(due: float) -> None:
            nonlocal workers
            now = self.clock()
            if now >= end or self.sent >= self.max_requests or self._stopping:
                workers -= 1
                if workers == 0:
                    done.set()
                return
            self._send(next(self.arrivals), due, now, after)

        def after(answered_at: float) -> None:
            if load.think_time_s:
                loop.call_later(load.think_time_s, next_request, answered_at + load.think_time_s)
            else:
                next_request(answered_at)

        for _ in range(load.concurrency):
            next_request(self.clock())
        if load.concurrency:
            await done.wait()

    def _send(
        self, arrival: Arrival, due: float, now: float, then: Callable[[float], None] | None
    ) -> None:
        seq = self.sent
        self.sent += 1
        lag = now - due
        klass = arrival.klass
        self._inflight[seq] = (due, lag, klass)
        expected = self.labels[arrival.batch] if self.labels else ()

        def answered(err: str | None, labels: Sequence[int] | None, degraded: bool = False) -> None:
            end = self.clock()
            if self._inflight.pop(seq, None) is None:
                return  # already written off as unfinished
            if err is None:
                self.ok += 1
                self.hist.add(end - due)
                correct = -1 if labels is None else sum(map(int.__eq__, labels, expected))
                self.records.add(due - self._start, lag, end - due, 0, klass, correct, degraded)
            else:
                self.errors += 1
                self.records.add(
                    due - self._start, lag, end - due, self.records.code(err), klass, 0
                )
            if then is not None:
                then(end)
            if not self._inflight:
                self._idle.set()

        self.client.submit(klass, arrival.batch, answered)
