"""Latency histograms as plain bucket counts, and their metric family at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import TypeVar

from prometheus_client.core import HistogramMetricFamily

K = TypeVar("K", bound=tuple[str, ...])

# From 100 us (an in-process call) to 10 s (a WAN call under load).
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BUCKET_LABELS = tuple(repr(b) for b in LATENCY_BUCKETS_S)


class Histogram:
    """Counts per latency bucket (the last one is +Inf) and the running sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for label, count in zip((*_BUCKET_LABELS, "+Inf"), self.counts, strict=True):
            running += count
            out.append((label, float(running)))
        return out


def histogram_family(
    name: str, doc: str, labels: list[str], values: Mapping[K, Histogram]
) -> HistogramMetricFamily:
    """One histogram family, a series per key of ``values``."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in list(values.items()):
        family.add_metric(list(key), histogram.cumulative(), histogram.total)
    return family
