"""Live estimates per (member, tier): the card seeds a cold tier, recent calls replace it, the
round trip is apart from the service time (a link change shows at once), old calls expire,
failures decay; and what a member's view shows of each of its tiers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from ensemble.config import LinkConfig
from ensemble.replicas.estimates import (
    HORIZON_S,
    MIN_SAMPLES,
    PlacementEstimate,
    measured_round_trip_s,
)
from ensemble.replicas.links import Link, LinkedReplica
from ensemble.replicas.member import Member
from ensemble.replicas.remote import RemoteReplica
from ensemble.types import TensorSpec

SEED = (0.001, 0.002)  # a card's p50 and p99, seconds


def fed(estimate: PlacementEstimate, latencies: Sequence[float], trip: float, now: float) -> None:
    for i, latency in enumerate(latencies):
        estimate.record(latency, trip, "success", now + i * 1e-3)


def test_a_cold_placement_is_its_card_plus_the_round_trip() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    view = estimate.view(True, 0.040, 0.5, now=0.0)
    assert view.samples == 0
    assert view.latency_s == pytest.approx(0.041)
    assert view.latency_p95_s == view.latency_p99_s == pytest.approx(0.042)
    assert view.round_trip_s == 0.040 and view.cost_per_call == 0.5 and view.ready
    unknown = PlacementEstimate("cloud", None).view(True, 0.040, 0.0, now=0.0)
    assert unknown.latency_s is None and unknown.tail_s("p95") is None


def test_recent_calls_replace_the_card_once_there_are_enough() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    fed(estimate, [0.045] * (MIN_SAMPLES - 1), trip=0.040, now=0.0)
    assert estimate.view(True, 0.040, 0.0, now=1.0).samples == 0  # too few: still the card
    fed(estimate, [0.045] * 8 + [0.060] * 2, trip=0.040, now=1.0)  # 17 calls, 2 slow ones
    view = estimate.view(True, 0.040, 0.0, now=2.0)
    assert view.samples == MIN_SAMPLES - 1 + 10
    assert view.latency_s == pytest.approx(0.045)
    assert view.latency_p95_s == pytest.approx(0.060)  # the queueing the card never saw


def test_a_link_change_shows_at_once_while_the_service_time_is_kept() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    fed(estimate, [0.043] * 20, trip=0.040, now=0.0)  # 3 ms of service behind a 40 ms trip
    assert estimate.view(True, 0.040, 0.0, now=1.0).latency_s == pytest.approx(0.043)
    slower = estimate.view(True, 0.300, 0.0, now=1.1)  # the link is slow now; no call since
    assert slower.latency_s == pytest.approx(0.303)
    assert estimate.view(True, 0.010, 0.0, now=1.2).latency_s == pytest.approx(0.013)


def test_calls_older_than_the_horizon_no_longer_count() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    fed(estimate, [0.050] * 20, trip=0.0, now=0.0)
    assert estimate.view(True, 0.0, 0.0, now=1.0).latency_s == pytest.approx(0.050)
    idle = estimate.view(True, 0.0, 0.0, now=HORIZON_S + 1.0)
    assert idle.samples == 0 and idle.latency_s == pytest.approx(SEED[0])


def test_an_abandoned_call_counts_only_as_a_slow_lower_bound() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    fed(estimate, [0.002] * 10, trip=0.0, now=0.0)
    estimate.record(0.0005, 0.0, "cancelled", 1.0)  # a hedge's fast loser: tells nothing
    assert estimate.view(True, 0.0, 0.0, now=2.0).samples == 10
    for i in range(10):  # calls cut off at a 15 ms deadline: at least that slow
        estimate.record(0.015, 0.0, "cancelled", 3.0 + i * 1e-3)
    view = estimate.view(True, 0.0, 0.0, now=4.0)
    assert view.samples == 20 and view.latency_p95_s == pytest.approx(0.015)
    assert view.error_rate == 0.0  # abandoning is no failure


def test_the_error_rate_counts_failures_and_forgets_them() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    for i in range(10):
        estimate.record(0.001, 0.0, "error" if i % 2 else "success", i * 1e-3)
    assert estimate.view(True, 0.0, 0.0, now=0.1).error_rate == pytest.approx(0.5, abs=1e-3)
    for i in range(10):  # healthy again, a minute later: the old failures weigh 1/64
        estimate.record(0.001, 0.0, "success", 60.0 + i * 1e-3)
    assert estimate.view(True, 0.0, 0.0, now=61.0).error_rate < 0.01


def test_the_view_is_the_same_object_while_nothing_changed() -> None:
    estimate = PlacementEstimate("cloud", SEED)
    first = estimate.view(True, 0.040, 0.0, now=0.0)
    assert estimate.view(True, 0.040, 0.0, now=0.1) is first
    assert estimate.view(False, 0.040, 0.0, now=0.2) is not first


class Answering:
    """An in-process replica that answers at once."""

    def __init__(self, name: str, tier: str) -> None:
        self.name, self.tier = name, tier

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return {"probabilities": np.zeros((1, 2), np.float32)}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Checked(RemoteReplica):
    """A remote replica whose health checks took 7 ms (no server behind it)."""

    async def _check(self) -> str | None:
        return None

    def _connect(self) -> None:
        return None

    async def _disconnect(self) -> None:
        return None

    async def _infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        return {}


def test_the_round_trip_is_the_health_checks_else_the_emulated_links() -> None:
    link = Link("cloud", LinkConfig(emulate=True, delay_ms=20))
    assert measured_round_trip_s(Answering("edge/0", "edge")) == 0.0
    assert measured_round_trip_s(LinkedReplica(Answering("cloud/0", "cloud"), link)) == 0.040
    link.override({"delay_ms": 75})
    assert measured_round_trip_s(LinkedReplica(Answering("cloud/0", "cloud"), link)) == 0.150
    remote = Checked("cloud/1", "cloud", "http://127.0.0.1:1", "m", ())
    assert measured_round_trip_s(LinkedReplica(remote, link, health_checked=True)) == 0.150
    remote.check_round_trip_s = 0.007  # once checked, what the checks took (link included)
    assert measured_round_trip_s(LinkedReplica(remote, link, health_checked=True)) == 0.007


def test_a_member_view_shows_each_tier_live() -> None:
    link = Link("cloud", LinkConfig(emulate=True, delay_ms=20))
    edge, cloud = Answering("edge/0", "edge"), LinkedReplica(Answering("cloud/0", "cloud"), link)
    spec = (TensorSpec("input", "FP32", (-1, 4)),)
    member = Member("m", spec, spec, None, [edge, cloud])
    member.tier_costs = {"edge": 0.0, "cloud": 0.5}
    view = member.view()
    assert [(p.tier, p.round_trip_s, p.cost_per_call) for p in view.placements] == [
        ("edge", 0.0, 0.0),
        ("cloud", 0.040, 0.5),
    ]
    assert member.view() is view  # nothing changed: the same view
    link.override({"partitioned": True})  # in-process replicas behind a cut link are unready
    cut = member.view()
    assert cut is not view and [p.ready for p in cut.placements] == [True, False]
    link.override({"partitioned": False, "delay_ms": 60})
    assert member.view().placements[1].round_trip_s == pytest.approx(0.120)


def test_a_bandwidth_cap_counts_the_last_calls_bytes_in_the_round_trip() -> None:
    import asyncio

    link = Link("cloud", LinkConfig(emulate=True, delay_ms=0))
    linked = LinkedReplica(Answering("cloud/0", "cloud"), link)
    feed = {"input": np.zeros((1, 64), np.float32)}  # 256 bytes out, 8 back
    asyncio.run(linked.infer(feed))
    assert measured_round_trip_s(linked) == 0.0  # no cap: bytes cost nothing
    link.override({"bandwidth_mbps": 0.1})
    assert measured_round_trip_s(linked) == pytest.approx(264 * 8 / 0.1e6)
