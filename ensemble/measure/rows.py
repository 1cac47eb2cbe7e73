"""One measured member x tier row, the Pareto front over (accuracy, p50) and the cost per call."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SplitFigures:
    """A split member's way of running, as its split policy sees a one-row call now."""

    option: str
    head_ms: float
    tail_ms: float
    sent_bytes: int
    returned_bytes: int
    expected_ms: float
    chosen: bool


@dataclass
class ProfileRow:
    """One member on one tier."""

    member: str
    tier: str
    backend: str
    placed: bool
    """False for a what-if row of ``--all-tiers`` (in-process on a tier it is not placed on)."""
    replicas: int
    link: str
    """The tier's emulated link, e.g. ``20ms``, or ``-`` when the config does not emulate it."""
    accuracy: float | None
    accuracy_source: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_rps: float | None = None
    calls: int = 0
    failures: int = 0
    rss_mb: float | None = None
    file_mb: float | None = None
    cost_per_1k: float | None = None
    pareto: bool = False
    notes: list[str] = field(default_factory=list)
    split: SplitFigures | None = None
    """For a split member's way of running (tier ``split:OPTION``): the policy's figures."""

    @property
    def label(self) -> str:
        return f"{self.member}@{self.tier}"


# -- the Pareto front -----------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which (accuracy, latency) points no other point dominates: higher accuracy and lower
    latency are better; a point is dominated by one at least as good on both and better on one.
    Points with a missing value are never on the front."""

    def usable(p: tuple[float | None, float | None]) -> bool:
        a, b = p
        return a is not None and b is not None and not (math.isnan(a) or math.isnan(b))

    flags = []
    for i, (acc, lat) in enumerate(points):
        if not usable((acc, lat)):
            flags.append(False)
            continue
        assert acc is not None and lat is not None
        dominated = False
        for j, (a2, l2) in enumerate(points):
            if j == i or not usable((a2, l2)):
                continue
            assert a2 is not None and l2 is not None
            if a2 >= acc and l2 <= lat and (a2 > acc or l2 < lat):
                dominated = True
                break
        flags.append(not dominated)
    return flags


def dominates(a: ProfileRow, b: ProfileRow) -> bool:
    """True when ``a`` is at least as accurate and as fast as ``b`` and better on one."""
    if None in (a.accuracy, a.p50_ms, b.accuracy, b.p50_ms):
        return False
    assert a.accuracy is not None and b.accuracy is not None
    assert a.p50_ms is not None and b.p50_ms is not None
    return (
        a.accuracy >= b.accuracy
        and a.p50_ms <= b.p50_ms
        and (a.accuracy > b.accuracy or a.p50_ms < b.p50_ms)
    )


def mark_pareto(rows: list[ProfileRow]) -> None:
    for row, flag in zip(rows, pareto_front([(r.accuracy, r.p50_ms) for r in rows]), strict=True):
        row.pareto = flag


# -- cost -----------------------------------------------------------------------------------


def cost_per_1k(
    cost_per_request: float, cost_per_replica_hour: float, replicas: int, throughput_rps: float
) -> float | None:
    """Price of 1,000 calls on a tier: 1,000 x ``cost_per_request`` plus the tier's replica-hours
    amortised over the calls they serve at the measured throughput (the replicas kept busy at
    that rate: a lower bound; idle replicas cost more per call). None when replicas cost money
    but no call succeeded."""
    per_call = cost_per_request
    if cost_per_replica_hour > 0:
        if throughput_rps <= 0:
            return None
        per_call += cost_per_replica_hour * replicas / 3600.0 / throughput_rps
    return per_call * 1000.0
