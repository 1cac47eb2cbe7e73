"""Arrival schedules: pure functions of the load shape and a seeded random.Random."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.scenario import (
    ClosedLoad,
    ConstantLoad,
    OpenLoad,
    PoissonLoad,
    SinusoidalLoad,
    SpikeLoad,
    StepLoad,
    TraceLoad,
)

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Arrival:
    """One planned request: intended send time (seconds from the start), class and sample batch."""

    t: float
    klass: int
    batch: int


def rate_at(load: StepLoad | SpikeLoad | SinusoidalLoad, t: float) -> float:
    """The target rate (requests per second) at time ``t``."""
    if isinstance(load, SinusoidalLoad):
        return load.mean_rps - load.amplitude_rps * math.cos(2 * math.pi * t / load.period_s)
    pieces = _pieces(load)
    i = bisect.bisect_right([start for start, _ in pieces], t) - 1
    return pieces[max(i, 0)][1]


def _pieces(load: StepLoad | SpikeLoad) -> list[tuple[float, float]]:
    """(start, rate) pairs of a piecewise-constant rate, starting at 0."""
    if isinstance(load, StepLoad):
        return [(s.at_s, s.rps) for s in load.steps]
    end = load.spike_at_s + load.spike_duration_s
    if load.spike_at_s == 0:
        return [(0.0, load.spike_rps), (end, load.base_rps)]
    return [(0.0, load.base_rps), (load.spike_at_s, load.spike_rps), (end, load.base_rps)]


def _targets(rng: random.Random, poisson: bool) -> Iterator[float]:
    """Values of the cumulative rate at which requests arrive.

    Evenly spaced arrivals sit at integers; Poisson ones at partial sums of Exp(1) draws, which
    the time-rescaling theorem turns into a non-homogeneous Poisson process of the given rate.
    """
    if not poisson:
        yield from itertools.count()
        return
    y = rng.expovariate(1.0)
    while True:
        yield y
        y += rng.expovariate(1.0)


def _piecewise_times(
    pieces: list[tuple[float, float]], duration: float, targets: Iterator[float]
) -> Iterator[float]:
    i, acc = 0, 0.0  # acc: cumulative rate at the start of piece i
    for y in targets:
        while True:
            start, rate = pieces[i]
            end = min(pieces[i + 1][0] if i + 1 < len(pieces) else duration, duration)
            span = rate * max(end - start, 0.0)
            if rate > 0 and y < acc + span:
                yield start + (y - acc) / rate
                break
            if i + 1 >= len(pieces) or end >= duration:
                return
            acc += span
            i += 1


def _sine_times(load: SinusoidalLoad, targets: Iterator[float]) -> Iterator[float]:
    mean, amp, period = load.mean_rps, load.amplitude_rps, load.period_s
    if mean <= 0:
        return
    wobble = amp * period / (2 * math.pi)  # |cumulative - mean * t| never exceeds this

    def cumulative(t: float) -> float:
        return mean * t - wobble * math.sin(2 * math.pi * t / period)

    prev = 0.0
    for y in targets:
        lo, hi = max(prev, (y - wobble) / mean), (y + wobble) / mean
        if lo >= load.duration_s:
            return
        t = lo
        for _ in range(100):  # safeguarded Newton: converges in a few steps, bisects at troughs
            f = cumulative(t) - y
            if abs(f) < 1e-9 or hi - lo < _EPS:
                break
            if f < 0:
                lo = t
            else:
                hi = t
            rate = mean - amp * math.cos(2 * math.pi * t / period)
            step = t - f / rate if rate > _EPS else math.inf
            t = step if lo < step < hi else (lo + hi) / 2
        if t >= load.duration_s:
            return
        prev = t
        yield t


def read_trace(path: Path) -> list[float]:
    """Timestamps (seconds, one per line, `#` comments) shifted so the first is 0; sorted check."""
    times: list[float] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            value = float(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a timestamp: {line!r}") from None
        if not math.isfinite(value) or (times and value < times[-1]):
            raise ValueError(f"{path}:{number}: timestamps must be finite and non-decreasing")
        times.append(value)
    if not times:
        raise ValueError(f"{path}: no timestamps")
    return [t - times[0] for t in times]


def arrival_times(
    load: OpenLoad, rng: random.Random, trace: Sequence[float] | None = None
) -> Iterator[float]:
    """Intended send times in seconds from the start, increasing, all before the duration."""
    if isinstance(load, ConstantLoad):
        if load.rps > 0:
            gap = 1.0 / load.rps
            yield from itertools.takewhile(
                lambda t: t < load.duration_s, (k * gap for k in itertools.count())
            )
    elif isinstance(load, PoissonLoad):
        t = rng.expovariate(load.rps) if load.rps > 0 else math.inf
        while t < load.duration_s:
            yield t
            t += rng.expovariate(load.rps)
    elif isinstance(load, StepLoad | SpikeLoad):
        targets = _targets(rng, load.arrivals == "poisson")
        yield from _piecewise_times(_pieces(load), load.duration_s, targets)
    elif isinstance(load, SinusoidalLoad):
        yield from _sine_times(load, _targets(rng, load.arrivals == "poisson"))
    else:
        assert isinstance(load, TraceLoad)
        if trace is None:
            raise ValueError("a trace load needs its timestamps")
        limit = load.duration_s if load.duration_s is not None else math.inf
        yield from itertools.takewhile(lambda t: t < limit, (t / load.speed for t in trace))


def plan(
    times: Iterable[float], weights: Sequence[float], batches: int, rng: random.Random
) -> Iterator[Arrival]:
    """Attach a request class (by weight) and a sample batch (uniform) to each arrival time."""
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    single = len(weights) == 1
    for t in times:
        klass = 0 if single else bisect.bisect_right(cumulative, rng.random() * total)
        yield Arrival(t, min(klass, len(weights) - 1), rng.randrange(batches))


def schedule_duration(load: OpenLoad | ClosedLoad, trace: Sequence[float] | None = None) -> float:
    """How long the schedule runs, seconds (a trace's own length unless cut)."""
    if isinstance(load, TraceLoad):
        natural = (trace[-1] if trace else 0.0) / load.speed
        return min(natural, load.duration_s) if load.duration_s is not None else natural
    return load.duration_s
