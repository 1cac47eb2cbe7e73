"""The gateway's metric state: what the request path records, and the collector that exports it.

The request path runs on one event loop, so it records into plain counters and histograms
(no locks, no label lookups) and a prometheus-client collector turns them into metric
families when `/metrics` is scraped. prometheus-client's own metric objects take a lock and
build label tuples on every update, which cost about an eighth of the gateway's CPU per
request. Record only from the event-loop thread.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ensemble.metrics.families import (
    admission_families,
    answer_families,
    autoscaler_families,
    config_families,
    feedback_families,
    frontend_families,
    link_families,
    member_call_families,
    placement_families,
    replica_families,
)
from ensemble.metrics.histogram import Histogram
from ensemble.metrics.splits import SplitReading, split_families
from ensemble.metrics.versions import VersionReading, version_families

if TYPE_CHECKING:
    from ensemble.replicas.links import LinkReading
    from ensemble.types import PlacementView


class GatewayMetrics:
    """The gateway's metrics, exported through a registry of their own (tests make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.request_latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.member_calls: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.member_latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.member_stages: defaultdict[tuple[str, str, str], Histogram] = defaultdict(Histogram)
        """Time member calls spent queued, computing and on a link, by (member, tier, stage)."""
        self.member_runs: defaultdict[tuple[str, str], int] = defaultdict(int)
        """In-process session runs by (member, tier); each serves a batch of calls."""
        self.members_asked: defaultdict[str, int] = defaultdict(int)
        self.members_answered: defaultdict[str, int] = defaultdict(int)
        self.escalations: defaultdict[str, int] = defaultdict(int)
        """Selection stages after a request's first (a cascade asking its next member)."""
        self.uncertain: defaultdict[tuple[str, str], int] = defaultdict(int)
        """Answers a profile judged uncertain, by (ensemble, escalated: yes or no)."""
        self.drift: Callable[[], Iterable[tuple[str, float | None]]] = tuple
        """Read at scrape time: (ensemble, its last input drift score or None) per watch."""
        self.hedges: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        """Hedges by (member, tier, outcome: sent or won)."""
        self.retries: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.violations: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.degraded: defaultdict[str, int] = defaultdict(int)
        self.cost: defaultdict[str, float] = defaultdict(float)
        self.replicas: Callable[[], Iterable[tuple[str, str, str, bool, bool, int, int]]] = tuple
        """Read at scrape time: (member, replica, tier, ready now, ejected now, times ejected,
        children restarted: a process replica's, 0 for other backends)."""
        self.inflight = 0
        self.admission: Callable[[], tuple[int, int]] = lambda: (0, 0)
        """Read at scrape time: (requests running, requests waiting) at the admission gate."""
        self.admission_limit: Callable[[], float | None] = lambda: None
        """Read at scrape time: an adaptive admission policy's limit now (None: not adaptive)."""
        self.autoscaler: Callable[[], Iterable[tuple[str, str, int, int | None]]] = tuple
        """Read at scrape time: (member, tier, replicas now, replicas desired or None)."""
        self.scaling_decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        """Changes of desired replicas by (member, tier, direction)."""
        self.replica_seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        """Replica-seconds each (member, tier) placement has held (the control loop adds)."""
        self.spend: defaultdict[tuple[str, str], float] = defaultdict(float)
        """Money spent by (tier, kind): `replicas` (replica-seconds times the tier's price per
        replica-hour) and `requests` (member calls times the tier's price per call)."""
        self.shed: defaultdict[str, int] = defaultdict(int)
        """Requests shed by admission control, by reason (full, evicted, deadline)."""
        self.reloads: defaultdict[str, int] = defaultdict(int)
        self.last_reload_success_s = 0.0
        self.integrity_failures: defaultdict[str, int] = defaultdict(int)
        """Model files refused for their digest, by member."""
        self.readiness: Callable[[], Mapping[str, bool]] = dict
        """Read at scrape time: each model's readiness now (the dispatcher sets it)."""
        self.feedback: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.rolling_accuracy: dict[tuple[str, str], float] = {}
        """(ensemble, member) -> accuracy over the member's recent labelled rows."""
        self.selection_weights: Callable[[], Iterable[tuple[str, str, str, float]]] = tuple
        """Read at scrape time: (ensemble, profile, member, weight) learned from feedback."""
        self.feedback_store: Callable[[], tuple[int, int]] = lambda: (0, 0)
        """Read at scrape time: answers kept for feedback, and the bytes they hold."""
        self.placements: Callable[[], Iterable[tuple[str, PlacementView]]] = tuple
        """Read at scrape time: (member, its live view on one tier) for every placement."""
        self.versions: Callable[[], Iterable[VersionReading]] = tuple
        """Read at scrape time: each served version of members that serve several."""
        self.splits: Callable[[], Iterable[SplitReading]] = tuple
        """Read at scrape time: each way to run each split member's calls."""
        self.links: Callable[[], Iterable[LinkReading]] = tuple
        """Read at scrape time: the emulated links' state and counters (the gateway sets it)."""
        self.rejections: defaultdict[tuple[str, str], int] = defaultdict(int)
        """Requests answered with an error, by (protocol, reason)."""
        self.connections_closed: defaultdict[tuple[str, str], int] = defaultdict(int)
        """Client connections the gateway closed or refused, by (protocol, reason)."""
        self.open_connections: Callable[[], Iterable[tuple[str, int]]] = tuple
        """Read at scrape time: (protocol, client connections open now)."""
        self.process = (
            ProcessCollector(registry=None),
            PlatformCollector(registry=None),
            GCCollector(registry=CollectorRegistry()),  # it must register somewhere
        )
        """prometheus-client's own: the process's CPU, memory, descriptors and start time
        (`process_*`), the interpreter (`python_info`) and its garbage collector (`python_gc_*`)."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def record_request(self, model: str, protocol: str, outcome: str, seconds: float) -> None:
        """Count one finished request; latency is recorded for known models only."""
        self.requests[(model, protocol, outcome)] += 1
        if model:
            self.request_latency[(model, protocol)].observe(seconds)

    def record_rejection(self, protocol: str, reason: str) -> None:
        """Count a request answered with an error (any route), by the error's reason."""
        self.rejections[(protocol, reason)] += 1

    def record_connection_closed(self, protocol: str, reason: str) -> None:
        """Count a client connection closed by the gateway: limit, evicted, header_timeout,
        header_too_large, idle_timeout, write_timeout."""
        self.connections_closed[(protocol, reason)] += 1

    def record_member_call(self, member: str, tier: str, outcome: str, seconds: float) -> None:
        """Count one call to a member replica and its latency."""
        self.member_calls[(member, tier, outcome)] += 1
        self.member_latency[(member, tier)].observe(seconds)

    def record_run(
        self, member: str, tier: str, queues_s: Sequence[float], compute_s: float
    ) -> None:
        """One in-process session run (the engine's) of a batch: each call's wait for a
        thread, and the run's time, which every call of the batch spent."""
        self.member_runs[(member, tier)] += 1
        queue = self.member_stages[(member, tier, "queue")]
        compute = self.member_stages[(member, tier, "compute")]
        for queue_s in queues_s:
            queue.observe(queue_s)
            compute.observe(compute_s)

    def record_link(self, member: str, tier: str, seconds: float) -> None:
        """The time a call spent crossing an emulated link, both ways."""
        self.member_stages[(member, tier, "link")].observe(seconds)

    def record_completeness(
        self, ensemble: str, asked: int, answered: int, stages: int = 1
    ) -> None:
        """Members one request asked and that answered, and its selection stages (more than
        one: a cascade escalated)."""
        self.members_asked[ensemble] += asked
        self.members_answered[ensemble] += answered
        if stages > 1:
            self.escalations[ensemble] += stages - 1

    def record_uncertain(self, ensemble: str, escalated: bool) -> None:
        """An answer was judged uncertain (and escalated to more members, or not)."""
        self.uncertain[(ensemble, "yes" if escalated else "no")] += 1

    def record_hedge(self, member: str, tier: str, won: bool) -> None:
        """A hedge went out for a call to ``member`` (``tier``: where the call was answered,
        or last tried); ``won`` when its answer was used."""
        self.hedges[(member, tier, "sent")] += 1
        if won:
            self.hedges[(member, tier, "won")] += 1

    def record_call_extras(
        self, model: str, member: str, tier: str, retries: int, cost: float
    ) -> None:
        """Retries a member call needed (failovers to another replica or tier) and its cost
        (counted against the tier that answered last)."""
        if retries:
            self.retries[(member, tier)] += retries
        if cost:
            self.cost[model] += cost
            self.spend[(tier, "requests")] += cost

    def record_violations(self, ensemble: str, kinds: Iterable[str], action: str) -> None:
        """A request's contract was not met in each of ``kinds``; ``action`` is on_violation."""
        for kind in kinds:
            self.violations[(ensemble, kind, action)] += 1

    def record_degraded(self, ensemble: str) -> None:
        """An answer went out flagged degraded (partial, fallback, or contract not met)."""
        self.degraded[ensemble] += 1

    def record_integrity_failure(self, member: str) -> None:
        """Count a member's model file refused because it does not match its card's or config's
        SHA-256 (or has neither), on a reload or when a replica is added."""
        self.integrity_failures[member] += 1

    def record_reload(self, outcome: str) -> None:
        """Count a config reload attempt: `success` or `failure` (rejected, old config kept)."""
        self.reloads[outcome] += 1
        if outcome == "success":
            self.last_reload_success_s = time.time()

    def record_feedback(self, ensemble: str, outcome: str) -> None:
        """Count one feedback post: accepted, unknown_id, duplicate, invalid or unauthorized."""
        self.feedback[(ensemble, outcome)] += 1

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector hook: the current values as metric families."""
        yield from frontend_families(self)
        yield from member_call_families(self)
        yield from admission_families(self)
        yield from autoscaler_families(self)
        yield from answer_families(self)
        yield from replica_families(self)
        yield from config_families(self)
        yield from feedback_families(self)
        yield from link_families(self.links())
        yield from placement_families(self.placements())
        yield from version_families(self.versions())
        yield from split_families(self.splits())
        for collector in self.process:
            yield from collector.collect()

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
