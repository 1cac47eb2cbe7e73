"""Live estimates per (member, tier): what a call there takes now, split into the network's
round trip and the service time behind it, so a change of link shows at once and an idle
tier is judged on its health checks rather than on old calls."""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable

import numpy as np

from ensemble.replicas.base import Replica, innermost
from ensemble.replicas.links import LinkedReplica, round_trip_s
from ensemble.types import PlacementView

WINDOW = 256
"""Service times kept per placement (the most recent)."""
MIN_SAMPLES = 8
"""Recent calls needed before they replace the card's figures."""
HORIZON_S = 30.0
"""Calls older than this no longer count: an idle tier's service time goes back to its card's."""
ERROR_HALF_LIFE_S = 10.0
"""A failure counts half as much in the error rate after this long."""
REFRESH_S = 0.5
"""Quantiles are recomputed at most this often, or after 16 new calls (not on every call)."""


def round_trip_reader(replica: Replica) -> Callable[[], float]:
    """``measured_round_trip_s`` of ``replica`` as a function to call each time: a replica's
    wrappers never change, so one with neither health checks nor emulated links reads 0 at no
    cost (the attribute lookups each read would otherwise repeat on every call)."""
    found: Replica | None = replica
    while found is not None:
        if isinstance(found, LinkedReplica) or hasattr(found, "check_round_trip_s"):
            return functools.partial(measured_round_trip_s, replica)
        found = getattr(found, "inner", None)
    return _no_round_trip


def _no_round_trip() -> float:
    return 0.0


def measured_round_trip_s(replica: Replica) -> float:
    """The network's share of a call to ``replica`` now: its server's last health check's round
    trip when it has active checks (they cross the real network and any emulated link), else
    what the emulated links add (``links.round_trip_s``; 0 in process with no link)."""
    checked = getattr(innermost(replica), "check_round_trip_s", None)
    return checked if isinstance(checked, float) else round_trip_s(replica)


class PlacementEstimate:
    """One member's calls on one tier: recent service times (call latency less the round trip
    when it ended), and a decaying failure rate. Event-loop thread only.

    ``seed``: the member card's (p50, p99) service time in seconds, used until ``MIN_SAMPLES``
    calls are in the horizon (None without a card: the latency is then unknown)."""

    __slots__ = (
        "_calls",
        "_computed_at",
        "_errors",
        "_fresh",
        "_new",
        "_quantiles",
        "_seen",
        "_service",
        "_stamps",
        "_touched",
        "_view",
        "seed",
        "tier",
    )

    def __init__(self, tier: str, seed: tuple[float, float] | None) -> None:
        self.tier = tier
        self.seed = seed
        self._service = array("d")
        self._stamps = array("d")
        self._seen = 0
        """Service times recorded, ever (the ring's write position)."""
        self._new = 0
        self._fresh = 0
        """Samples in the horizon at the last recompute."""
        self._quantiles: tuple[float, float, float] | None = None
        self._computed_at = -HORIZON_S
        self._calls = 0.0
        self._errors = 0.0
        self._touched = 0.0
        self._view: PlacementView | None = None

    def record(self, latency_s: float, round_trip: float, outcome: str, now: float) -> None:
        """A call ended: ``success``, ``error``, or ``cancelled`` (abandoned unanswered: its
        time so far is a lower bound, kept only when it is slower than the median, so a tier
        that stopped answering in time looks slow rather than unknown)."""
        service = max(0.0, latency_s - round_trip)
        if outcome == "cancelled":
            known = self._quantiles
            median = known[0] if known is not None else (self.seed or (0.0, 0.0))[0]
            if service <= median:
                return
        else:
            self._decay(now)
            self._calls += 1.0
            if outcome != "success":
                self._errors += 1.0
                return
        if len(self._service) < WINDOW:
            self._service.append(service)
            self._stamps.append(now)
        else:
            slot = self._seen % WINDOW
            self._service[slot] = service
            self._stamps[slot] = now
        self._seen += 1
        self._new += 1

    def _decay(self, now: float) -> None:
        if self._calls:
            factor = 0.5 ** ((now - self._touched) / ERROR_HALF_LIFE_S)
            self._calls *= factor
            self._errors *= factor
        self._touched = now

    def _refresh(self, now: float) -> None:
        """Recompute the service quantiles from the calls in the horizon, when due (and as
        soon as there may be enough of them to replace the card's)."""
        cold = self._quantiles is None and self._fresh + self._new >= MIN_SAMPLES
        if self._new < 16 and now - self._computed_at < REFRESH_S and not cold:
            return
        self._new = 0
        self._computed_at = now
        since = now - HORIZON_S
        # Copies, not views: a view of the ring would keep it from growing.
        recent = np.array(self._service)[np.array(self._stamps) >= since]
        n = len(recent)
        quantiles = None
        if n >= MIN_SAMPLES:
            ranks = (n // 2, min(n - 1, int(0.95 * n)), n - 1 if n < 100 else int(0.99 * n))
            ordered = np.partition(recent, ranks)  # those ranks in sorted order, the rest not
            quantiles = (
                float(ordered[ranks[0]]),
                float(ordered[ranks[1]]),
                float(ordered[ranks[2]]),
            )
        if quantiles != self._quantiles or n != self._fresh:
            self._quantiles, self._fresh = quantiles, n
            self._view = None

    def view(self, ready: bool, round_trip: float, cost: float, now: float) -> PlacementView:
        """The placement as selection sees it now (the same object while nothing changed)."""
        self._refresh(now)
        view = self._view
        error_rate = round(self._errors / self._calls, 3) if self._calls >= 1.0 else 0.0
        if (
            view is not None
            and view.ready == ready
            and view.round_trip_s == round_trip
            and view.cost_per_call == cost
            and view.error_rate == error_rate
        ):
            return view
        quantiles = self._quantiles
        samples = self._fresh if quantiles is not None else 0
        if quantiles is None and self.seed is not None:
            quantiles = (self.seed[0], self.seed[1], self.seed[1])
        if quantiles is None:
            p50 = p95 = p99 = None
        else:
            p50, p95, p99 = (round_trip + q for q in quantiles)
        view = self._view = PlacementView(
            self.tier, ready, p50, p95, p99, round_trip, error_rate, cost, samples
        )
        return view
