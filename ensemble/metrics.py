"""Prometheus metrics of the gateway, one `ensemble_` prefix, units in names.

The request path runs on one event loop, so it records into plain counters and histograms
(no locks, no label lookups) and a prometheus-client collector turns them into metric
families when `/metrics` is scraped. prometheus-client's own metric objects take a lock and
build label tuples on every update, which cost about an eighth of the gateway's CPU per
request. Record only from the event-loop thread.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ensemble.errors import REJECTION_REASONS

if TYPE_CHECKING:
    from ensemble.links import LinkReading

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


class GatewayMetrics:
    """The gateway's metrics, exported through a registry of their own (tests make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.request_latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.member_calls: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.member_latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.members_asked: defaultdict[str, int] = defaultdict(int)
        self.members_answered: defaultdict[str, int] = defaultdict(int)
        self.hedges: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.retries: defaultdict[str, int] = defaultdict(int)
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
        self.links: Callable[[], Iterable[LinkReading]] = tuple
        """Read at scrape time: the emulated links' state and counters (the gateway sets it)."""
        self.rejections: defaultdict[tuple[str, str], int] = defaultdict(int)
        """Requests answered with an error, by (protocol, reason)."""
        self.connections_closed: defaultdict[tuple[str, str], int] = defaultdict(int)
        """Client connections the gateway closed or refused, by (protocol, reason)."""
        self.open_connections: Callable[[], Iterable[tuple[str, int]]] = tuple
        """Read at scrape time: (protocol, client connections open now)."""
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
        header_too_large, idle_timeout."""
        self.connections_closed[(protocol, reason)] += 1

    def record_member_call(self, member: str, tier: str, outcome: str, seconds: float) -> None:
        """Count one call to a member replica and its latency."""
        self.member_calls[(member, tier, outcome)] += 1
        self.member_latency[(member, tier)].observe(seconds)

    def record_completeness(self, ensemble: str, asked: int, answered: int) -> None:
        self.members_asked[ensemble] += asked
        self.members_answered[ensemble] += answered

    def record_hedge(self, member: str, won: bool) -> None:
        """A hedge went out for a call to ``member``; ``won`` when its answer was used."""
        self.hedges[(member, "sent")] += 1
        if won:
            self.hedges[(member, "won")] += 1

    def record_call_extras(
        self, model: str, member: str, tier: str, retries: int, cost: float
    ) -> None:
        """Retries a member call needed (failovers to another replica or tier) and its cost
        (counted against the tier that answered last)."""
        if retries:
            self.retries[member] += retries
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
        requests = CounterMetricFamily(
            "ensemble_requests",
            "Inference requests by model, protocol and outcome "
            "(success, client_error, server_error, unavailable).",
            labels=["model", "protocol", "outcome"],
        )
        for key, value in list(self.requests.items()):
            requests.add_metric(list(key), value)
        yield requests
        rejected = CounterMetricFamily(
            "ensemble_rejected_requests",
            "Requests answered with an error, on any route, by protocol and reason: "
            + ", ".join(REJECTION_REASONS)
            + ".",
            labels=["protocol", "reason"],
        )
        for pair, value in list(self.rejections.items()):
            rejected.add_metric(list(pair), value)
        yield rejected
        closed = CounterMetricFamily(
            "ensemble_connections_closed",
            "Client connections the gateway closed or refused, by protocol and reason: limit "
            "(refused at server.max_connections), evicted (not in a request, closed for a new "
            "connection at the cap), header_timeout, header_too_large, idle_timeout.",
            labels=["protocol", "reason"],
        )
        for pair, value in list(self.connections_closed.items()):
            closed.add_metric(list(pair), value)
        yield closed
        open_now = GaugeMetricFamily(
            "ensemble_open_connections",
            "Client connections open now, by protocol (http).",
            labels=["protocol"],
        )
        for protocol, count in self.open_connections():
            open_now.add_metric([protocol], count)
        yield open_now
        yield _histograms(
            "ensemble_request_duration_seconds",
            "End-to-end inference latency inside the gateway, by model and protocol.",
            ["model", "protocol"],
            self.request_latency,
        )
        calls = CounterMetricFamily(
            "ensemble_member_calls",
            "Calls to member replicas by member, tier and outcome (success, error).",
            labels=["member", "tier", "outcome"],
        )
        for key, value in list(self.member_calls.items()):
            calls.add_metric(list(key), value)
        yield calls
        yield _histograms(
            "ensemble_member_call_duration_seconds",
            "Latency of one call to a member replica, by member and tier.",
            ["member", "tier"],
            self.member_latency,
        )
        for name, doc, values in (
            (
                "ensemble_members_asked",
                "Members asked to answer, summed over requests, by ensemble.",
                self.members_asked,
            ),
            (
                "ensemble_members_answered",
                "Members whose answer was aggregated, summed over requests, by ensemble.",
                self.members_answered,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["ensemble"])
            for ensemble, value in list(values.items()):
                family.add_metric([ensemble], value)
            yield family
        yield GaugeMetricFamily(
            "ensemble_inflight_requests", "Inference requests being processed now.", self.inflight
        )
        running, waiting = self.admission()
        yield GaugeMetricFamily(
            "ensemble_admission_running", "Requests holding an admission slot now.", running
        )
        yield GaugeMetricFamily(
            "ensemble_admission_waiting", "Requests waiting for an admission slot now.", waiting
        )
        if (limit := self.admission_limit()) is not None:
            yield GaugeMetricFamily(
                "ensemble_admission_limit",
                "Requests an adaptive admission policy lets run at once now.",
                limit,
            )
        shed = CounterMetricFamily(
            "ensemble_shed_requests",
            "Requests shed by admission control (429 / RESOURCE_EXHAUSTED) by reason: full "
            "(queue full, the newcomer least important), evicted (a waiting request made room "
            "for a more important one), deadline (waited until its deadline, or had less time left "
            "than a typical request takes when a slot came free).",
            labels=["reason"],
        )
        for reason, count in list(self.shed.items()):
            shed.add_metric([reason], count)
        yield shed
        replicas = GaugeMetricFamily(
            "ensemble_autoscaler_replicas",
            "The control loop's view per member placement: replicas now (`current`) and the "
            "policy's target (`desired`, while it wants a change).",
            labels=["member", "tier", "kind"],
        )
        for member, tier, now, desired in list(self.autoscaler()):
            replicas.add_metric([member, tier, "current"], now)
            if desired is not None:
                replicas.add_metric([member, tier, "desired"], desired)
        yield replicas
        decisions = CounterMetricFamily(
            "ensemble_autoscaler_decisions",
            "Changes of a placement's desired replicas, by direction.",
            labels=["member", "tier", "direction"],
        )
        for (member, tier, direction), count in list(self.scaling_decisions.items()):
            decisions.add_metric([member, tier, direction], count)
        yield decisions
        held = CounterMetricFamily(
            "ensemble_replica_seconds",
            "Replica-seconds held per member placement (sampled by the control loop).",
            labels=["member", "tier"],
        )
        for (member, tier), seconds in list(self.replica_seconds.items()):
            held.add_metric([member, tier], seconds)
        yield held
        spend = CounterMetricFamily(
            "ensemble_spend",
            "Money spent per tier, in the config's currency: `replicas` (replica-seconds times "
            "the tier's cost_per_replica_hour / 3600) and `requests` (member calls times its "
            "cost_per_request, hedges and retries included).",
            labels=["tier", "kind"],
        )
        for (tier, kind), total in list(self.spend.items()):
            spend.add_metric([tier, kind], total)
        yield spend
        hedges = CounterMetricFamily(
            "ensemble_hedges",
            "Hedged calls by member: sent (a second copy went out) and won (its answer was used).",
            labels=["member", "outcome"],
        )
        for (member, outcome), count in list(self.hedges.items()):
            hedges.add_metric([member, outcome], count)
        yield hedges
        retries = CounterMetricFamily(
            "ensemble_retries",
            "Member calls re-sent to another replica or tier after a failure (failovers).",
            labels=["member"],
        )
        for member, count in list(self.retries.items()):
            retries.add_metric([member], count)
        yield retries
        violations = CounterMetricFamily(
            "ensemble_contract_violations",
            "Requests whose contract was not met, by kind (deadline, availability, accuracy, "
            "cost) and the profile's on_violation action.",
            labels=["ensemble", "kind", "action"],
        )
        for triple, count in list(self.violations.items()):
            violations.add_metric(list(triple), count)
        yield violations
        degraded = CounterMetricFamily(
            "ensemble_degraded_answers",
            "Answers flagged degraded: partial, from the fallback member, or short of the "
            "contract.",
            labels=["ensemble"],
        )
        for ensemble, count in list(self.degraded.items()):
            degraded.add_metric([ensemble], count)
        yield degraded
        cost = CounterMetricFamily(
            "ensemble_cost",
            "Accumulated price of member calls (hedges and retries included), in the config's "
            "currency, by requested model.",
            labels=["model"],
        )
        for model, total in list(self.cost.items()):
            cost.add_metric([model], total)
        yield cost
        replica_ready = GaugeMetricFamily(
            "ensemble_replica_ready",
            "1 while the replica can take calls (a remote one: its last health checks passed), "
            "else 0.",
            labels=["member", "replica", "tier"],
        )
        ejected = GaugeMetricFamily(
            "ensemble_replica_ejected",
            "1 while outlier detection keeps the replica out of routing, else 0.",
            labels=["member", "replica", "tier"],
        )
        ejections = CounterMetricFamily(
            "ensemble_replica_ejections",
            "Times outlier detection ejected the replica.",
            labels=["member", "replica", "tier"],
        )
        restarts = CounterMetricFamily(
            "ensemble_replica_restarts",
            "Children a `process` replica started in place of one that died on its own (0 for "
            "other backends; a replica replaced by a reload or a scale-down starts over at 0).",
            labels=["member", "replica", "tier"],
        )
        for member, replica, tier, is_ready, is_ejected, times, restarted in self.replicas():
            replica_ready.add_metric([member, replica, tier], 1.0 if is_ready else 0.0)
            ejected.add_metric([member, replica, tier], 1.0 if is_ejected else 0.0)
            ejections.add_metric([member, replica, tier], times)
            restarts.add_metric([member, replica, tier], restarted)
        yield replica_ready
        yield ejected
        yield ejections
        yield restarts
        reloads = CounterMetricFamily(
            "ensemble_config_reloads",
            "Config reloads by outcome (success, failure: rejected, the old config kept serving).",
            labels=["outcome"],
        )
        for outcome in ("success", "failure"):
            reloads.add_metric([outcome], self.reloads.get(outcome, 0))
        yield reloads
        integrity = CounterMetricFamily(
            "ensemble_model_integrity_failures",
            "Model files refused because their SHA-256 does not match the member's card or "
            "config pin (or neither exists), by member: on a reload (the old config kept "
            "serving) or when a replica is added.",
            labels=["member"],
        )
        for member, count in list(self.integrity_failures.items()):
            integrity.add_metric([member], count)
        yield integrity
        yield GaugeMetricFamily(
            "ensemble_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload (0: none since start).",
            self.last_reload_success_s,
        )
        ready = GaugeMetricFamily(
            "ensemble_model_ready", "1 when the model can answer, else 0.", labels=["model"]
        )
        for model, is_ready in self.readiness().items():
            ready.add_metric([model], 1.0 if is_ready else 0.0)
        yield ready
        feedback = CounterMetricFamily(
            "ensemble_feedback",
            "Feedback posts (true labels joined by feedback id) by ensemble and outcome "
            "(accepted, unknown_id, duplicate, invalid, unauthorized).",
            labels=["ensemble", "outcome"],
        )
        for pair, count in list(self.feedback.items()):
            feedback.add_metric(list(pair), count)
        yield feedback
        entries, size = self.feedback_store()
        yield GaugeMetricFamily(
            "ensemble_feedback_store_answers",
            "Answers kept for feedback (at most server.feedback_window).",
            entries,
        )
        yield GaugeMetricFamily(
            "ensemble_feedback_store_bytes",
            "Memory the answers kept for feedback hold, estimated (at most "
            "server.feedback_max_bytes).",
            size,
        )
        accuracy = GaugeMetricFamily(
            "ensemble_member_rolling_accuracy",
            "Share of a member's last labelled rows it classified right (a sliding window of "
            "server.feedback_accuracy_window rows).",
            labels=["ensemble", "member"],
        )
        for pair, share in list(self.rolling_accuracy.items()):
            accuracy.add_metric(list(pair), share)
        yield accuracy
        weights = GaugeMetricFamily(
            "ensemble_selection_weight",
            "Member weight a selection profile learned from feedback (Exp4's, summing to 1).",
            labels=["ensemble", "profile", "member"],
        )
        for ensemble, profile, member, weight in self.selection_weights():
            weights.add_metric([ensemble, profile, member], weight)
        yield weights
        yield from _link_families(self.links())

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _histograms(
    name: str, doc: str, labels: list[str], values: dict[tuple[str, str], Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in list(values.items()):
        family.add_metric(list(key), histogram.cumulative(), histogram.total)
    return family


def _link_families(readings: Iterable[LinkReading]) -> Iterator[Metric]:
    partitioned = GaugeMetricFamily(
        "ensemble_link_partitioned",
        "1 while the emulated link to the tier is partitioned, else 0.",
        labels=["tier"],
    )
    delay = GaugeMetricFamily(
        "ensemble_link_delay_seconds",
        "One-way delay of the emulated link to the tier, before jitter.",
        labels=["tier"],
    )
    loss = GaugeMetricFamily(
        "ensemble_link_loss_ratio", "Share of calls the emulated link drops.", labels=["tier"]
    )
    failures = CounterMetricFamily(
        "ensemble_link_failures",
        "Calls and health checks the emulated link failed, by kind (dropped, reset, partitioned).",
        labels=["tier", "kind"],
    )
    changes = CounterMetricFamily(
        "ensemble_link_changes",
        "Runtime changes to the emulated link through the admin API.",
        labels=["tier"],
    )
    for r in readings:
        partitioned.add_metric([r.tier], 1.0 if r.partitioned else 0.0)
        delay.add_metric([r.tier], r.delay_s)
        loss.add_metric([r.tier], r.loss)
        for kind, count in r.failures.items():
            failures.add_metric([r.tier, kind], count)
        changes.add_metric([r.tier], r.changes)
    yield from (partitioned, delay, loss, failures, changes)
