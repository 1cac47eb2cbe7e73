"""Arrival schedules are pure functions of the shape and a seeded RNG: rates, shapes, replay."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loadtest.scenario import ConstantLoad, OpenLoad, parse_scenario
from loadtest.shapes import arrival_times, plan, rate_at, read_trace, schedule_duration


def load(spec: dict[str, Any]) -> Any:
    doc = {"target": {"url": "http://127.0.0.1:1"}, "load": spec}
    return parse_scenario(doc).load


def times(spec: dict[str, Any], seed: int = 0, trace: list[float] | None = None) -> list[float]:
    return list(arrival_times(load(spec), random.Random(seed), trace))


def count_between(ts: list[float], lo: float, hi: float) -> int:
    return sum(lo <= t < hi for t in ts)


def test_constant_is_evenly_spaced() -> None:
    ts = times({"shape": "constant", "rps": 50, "duration_s": 2})
    assert len(ts) == 100
    assert ts[0] == 0.0
    assert all(math.isclose(b - a, 0.02) for a, b in itertools.pairwise(ts))


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    ts = times({"shape": "poisson", "rps": 200, "duration_s": 100}, seed=7)
    assert len(ts) == pytest.approx(20_000, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 200, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean (coefficient of variation 1).
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    assert all(0 <= t < 100 for t in ts) and ts == sorted(ts)


def test_same_seed_same_schedule_other_seed_differs() -> None:
    spec = {"shape": "poisson", "rps": 100, "duration_s": 5}
    assert times(spec, seed=3) == times(spec, seed=3)
    assert times(spec, seed=3) != times(spec, seed=4)


def test_step_uniform_counts_per_step() -> None:
    steps = [{"at_s": 0, "rps": 10}, {"at_s": 2, "rps": 100}, {"at_s": 3, "rps": 0}]
    spec = {"shape": "step", "duration_s": 5, "arrivals": "uniform", "steps": steps}
    ts = times(spec)
    assert count_between(ts, 0, 2) == 20
    assert count_between(ts, 2, 3) == 100
    assert count_between(ts, 3, 5) == 0
    assert rate_at(load(spec), 2.5) == 100


def test_step_poisson_follows_the_steps() -> None:
    steps = [{"at_s": 0, "rps": 50}, {"at_s": 20, "rps": 500}]
    ts = times({"shape": "step", "duration_s": 40, "steps": steps}, seed=1)
    assert count_between(ts, 0, 20) == pytest.approx(1000, rel=0.1)
    assert count_between(ts, 20, 40) == pytest.approx(10_000, rel=0.05)


def test_spike_shape() -> None:
    spec = {
        "shape": "spike",
        "duration_s": 10,
        "arrivals": "uniform",
        "base_rps": 10,
        "spike_rps": 200,
        "spike_at_s": 4,
        "spike_duration_s": 1,
    }
    ts = times(spec)
    assert count_between(ts, 0, 4) == 40
    assert count_between(ts, 4, 5) == 200
    assert count_between(ts, 5, 10) == 50
    shape = load(spec)
    assert [rate_at(shape, t) for t in (0, 4.5, 5.5)] == [10, 200, 10]


def test_spike_at_time_zero() -> None:
    spec = {"shape": "spike", "duration_s": 3, "arrivals": "uniform", "base_rps": 10,
            "spike_rps": 100, "spike_at_s": 0, "spike_duration_s": 1}  # fmt: skip
    ts = times(spec)
    assert count_between(ts, 0, 1) == 100 and count_between(ts, 1, 3) == 20


@pytest.mark.parametrize("arrivals", ["uniform", "poisson"])
def test_sinusoid_starts_at_trough_and_peaks_mid_period(arrivals: str) -> None:
    spec = {"shape": "sinusoidal", "mean_rps": 100, "amplitude_rps": 80, "period_s": 20,
            "duration_s": 40, "arrivals": arrivals}  # fmt: skip
    ts = times(spec, seed=2)
    assert len(ts) == pytest.approx(4000, rel=0.05 if arrivals == "poisson" else 0.001)
    trough = count_between(ts, 0, 2) + count_between(ts, 18, 22)  # around t = 0, 20
    peak = count_between(ts, 8, 12) + count_between(ts, 28, 32)  # around t = 10, 30
    # Integral of the rate over +-2 s around a trough (about 20+ req/s) vs a peak (about 180).
    assert peak > 5 * trough
    shape = load(spec)
    assert rate_at(shape, 0) == pytest.approx(20)
    assert rate_at(shape, 10) == pytest.approx(180)
    assert ts == sorted(ts)


def test_sinusoid_uniform_matches_the_cumulative_rate() -> None:
    spec = {"shape": "sinusoidal", "mean_rps": 50, "amplitude_rps": 50, "period_s": 10,
            "duration_s": 10, "arrivals": "uniform"}  # fmt: skip
    ts = times(spec)
    for k in (1, 100, 250, 499):
        t = ts[k]
        cumulative = 50 * t - 50 * 10 / (2 * math.pi) * math.sin(2 * math.pi * t / 10)
        assert cumulative == pytest.approx(k, abs=1e-6)


def test_trace_replay_speed_and_cut(tmp_path: Path) -> None:
    path = tmp_path / "arrivals.txt"
    path.write_text("# epoch seconds\n1000.0\n1000.5\n\n1001.0  # a comment\n1003.0\n")
    trace = read_trace(path)
    assert trace == [0.0, 0.5, 1.0, 3.0]
    spec = {"shape": "trace", "path": str(path)}
    assert times(spec, trace=trace) == [0.0, 0.5, 1.0, 3.0]
    assert times({**spec, "speed": 2.0}, trace=trace) == [0.0, 0.25, 0.5, 1.5]
    assert times({**spec, "duration_s": 1.0}, trace=trace) == [0.0, 0.5]
    assert schedule_duration(load(spec), trace) == 3.0
    assert schedule_duration(load({**spec, "speed": 2.0}), trace) == 1.5


@pytest.mark.parametrize(
    ("text", "problem"),
    [("1\n0.5\n", "non-decreasing"), ("1\nabc\n", "not a timestamp"), ("# nothing\n", "no time")],
)
def test_bad_traces(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_trace(path)


def test_plan_picks_classes_by_weight_and_batches_in_range() -> None:
    arrivals = list(plan((i / 100 for i in range(20_000)), [3, 1], 7, random.Random(0)))
    classes = Counter(a.klass for a in arrivals)
    assert classes[0] / len(arrivals) == pytest.approx(0.75, abs=0.02)
    assert {a.batch for a in arrivals} == set(range(7))
    assert [a.t for a in arrivals[:3]] == [0.0, 0.01, 0.02]


def test_zero_rate_sends_nothing() -> None:
    shape: OpenLoad = ConstantLoad(shape="constant", rps=0, duration_s=5)
    assert list(arrival_times(shape, random.Random(0))) == []
    assert times({"shape": "poisson", "rps": 0, "duration_s": 5}) == []
