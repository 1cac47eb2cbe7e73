"""Metric families of split members: the path each call took, and what each would take now."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True, slots=True)
class SplitReading:
    """One way to run a split member's call."""

    member: str
    option: str
    """`edge`, `cloud` or the cut tensor."""
    calls: int
    """Calls that took it."""
    expected_s: float
    """What its split policy expects a one-row call to take on it now."""
    chosen: bool
    """The policy's choice for a one-row call now."""


def split_families(readings: Iterable[SplitReading]) -> Iterator[Metric]:
    labels = ["member", "option"]
    calls = CounterMetricFamily(
        "ensemble_split_calls",
        "Calls of a split member by the way they ran: `edge` (all on the head tier), `cloud` "
        "(all on the tail tier) or the cut tensor (head on the edge, tail in the cloud).",
        labels=labels,
    )
    expected = GaugeMetricFamily(
        "ensemble_split_expected_seconds",
        "Expected latency of a one-row call of the split member on each way now: compute on "
        "each tier plus, across the link, its delay both ways and the bytes at its bandwidth.",
        labels=labels,
    )
    chosen = GaugeMetricFamily(
        "ensemble_split_chosen",
        "1 for the way the split policy would run a one-row call now, 0 for the others.",
        labels=labels,
    )
    for r in readings:
        key = [r.member, r.option]
        calls.add_metric(key, r.calls)
        expected.add_metric(key, r.expected_s)
        chosen.add_metric(key, 1.0 if r.chosen else 0.0)
    yield from (calls, expected, chosen)
