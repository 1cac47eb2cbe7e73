"""The metric families `/metrics` exposes, built from the gateway's metric state at scrape time.

One function per group of families; the collector chains them in this file's order, which is
the order of the exposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ensemble.errors import REJECTION_REASONS
from ensemble.metrics.histogram import histogram_family

if TYPE_CHECKING:
    from ensemble.metrics.gateway import GatewayMetrics
    from ensemble.replicas.links import LinkReading
    from ensemble.types import PlacementView


def _counter(
    name: str, doc: str, labels: list[str], items: Iterable[tuple[Sequence[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in list(items):
        family.add_metric(list(key), value)
    return family


def _by_one(values: Mapping[str, float]) -> list[tuple[tuple[str], float]]:
    """A mapping keyed by one label value, as the (label values, value) pairs `_counter` takes."""
    return [((key,), value) for key, value in list(values.items())]


def frontend_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Requests, rejections, client connections and end-to-end latency."""
    yield _counter(
        "ensemble_requests",
        "Inference requests by model, protocol (http, grpc) and outcome "
        "(success, client_error, server_error, unavailable, cancelled: by its caller).",
        ["model", "protocol", "outcome"],
        m.requests.items(),
    )
    yield _counter(
        "ensemble_rejected_requests",
        "Requests answered with an error, on any route, by protocol (http, grpc) and reason: "
        + ", ".join(REJECTION_REASONS)
        + ".",
        ["protocol", "reason"],
        m.rejections.items(),
    )
    yield _counter(
        "ensemble_connections_closed",
        "Client connections the gateway closed or refused, by protocol (http, grpc) and "
        "reason: limit "
        "(refused at server.max_connections), evicted (not in a request, closed for a new "
        "connection at the cap), header_timeout, header_too_large, idle_timeout, "
        "write_timeout (http: an answer unread past server.write_timeout_s), max_age "
        "(grpc on the uvicorn stack: retired at server.grpc_max_connection_age_s).",
        ["protocol", "reason"],
        m.connections_closed.items(),
    )
    open_now = GaugeMetricFamily(
        "ensemble_open_connections",
        "Client connections open now, by protocol (http; grpc on the uvicorn stack).",
        labels=["protocol"],
    )
    for protocol, count in m.open_connections():
        open_now.add_metric([protocol], count)
    yield open_now
    yield histogram_family(
        "ensemble_request_duration_seconds",
        "End-to-end inference latency inside the gateway, by model and protocol (http, grpc).",
        ["model", "protocol"],
        m.request_latency,
    )


def member_call_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Calls to member replicas, their latency, and how many members each request heard."""
    yield _counter(
        "ensemble_member_calls",
        "Calls to member replicas by member, tier and outcome (success, error, timeout: no "
        "answer by the request's deadline).",
        ["member", "tier", "outcome"],
        m.member_calls.items(),
    )
    yield _counter(
        "ensemble_member_runs",
        "Runs of in-process members' sessions by member and tier; each runs a batch of calls "
        "(calls per run: ensemble_member_calls_total over this, as Triton's inference and "
        "execution counts).",
        ["member", "tier"],
        m.member_runs.items(),
    )
    yield histogram_family(
        "ensemble_member_call_duration_seconds",
        "Latency of one call to a member replica, by member and tier.",
        ["member", "tier"],
        m.member_latency,
    )
    yield histogram_family(
        "ensemble_member_stage_duration_seconds",
        "Where member calls spend their time, by member, tier and stage: queue (waiting for "
        "an in-process thread), compute (the in-process session's run, shared by a batch), "
        "link (crossing an emulated link, both ways).",
        ["member", "tier", "stage"],
        m.member_stages,
    )
    yield _counter(
        "ensemble_members_asked",
        "Members asked to answer, summed over requests, by ensemble.",
        ["ensemble"],
        _by_one(m.members_asked),
    )
    yield _counter(
        "ensemble_escalations",
        "Selection stages after a request's first (a cascade asking its next member because "
        "the answers so far were not confident enough), summed over requests, by ensemble.",
        ["ensemble"],
        _by_one(m.escalations),
    )
    yield _counter(
        "ensemble_uncertain_answers",
        "Answers a profile judged uncertain (its `uncertainty` thresholds), by ensemble and "
        "whether they were escalated to more members (yes, no).",
        ["ensemble", "escalated"],
        list(m.uncertain.items()),
    )
    drift = GaugeMetricFamily(
        "ensemble_input_drift",
        "Mean per-feature PSI of the ensemble's last full window of input rows against the "
        "training distribution in its member cards (absent before the first window).",
        labels=["ensemble"],
    )
    for ensemble, score in m.drift():
        if score is not None:
            drift.add_metric([ensemble], score)
    yield drift
    yield _counter(
        "ensemble_members_answered",
        "Members whose answer was aggregated, summed over requests, by ensemble.",
        ["ensemble"],
        _by_one(m.members_answered),
    )


def admission_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Requests in flight, the admission gate's slots and queue, and what it shed."""
    yield GaugeMetricFamily(
        "ensemble_inflight_requests", "Inference requests being processed now.", m.inflight
    )
    running, waiting = m.admission()
    yield GaugeMetricFamily(
        "ensemble_admission_running", "Requests holding an admission slot now.", running
    )
    yield GaugeMetricFamily(
        "ensemble_admission_waiting", "Requests waiting for an admission slot now.", waiting
    )
    if (limit := m.admission_limit()) is not None:
        yield GaugeMetricFamily(
            "ensemble_admission_limit",
            "Requests an adaptive admission policy lets run at once now.",
            limit,
        )
    yield _counter(
        "ensemble_shed_requests",
        "Requests shed by admission control (429 / RESOURCE_EXHAUSTED) by reason: full "
        "(queue full, the newcomer least important), evicted (a waiting request made room "
        "for a more important one), deadline (waited until its deadline, or had less time left "
        "than a typical request takes when a slot came free).",
        ["reason"],
        _by_one(m.shed),
    )


def autoscaler_families(m: GatewayMetrics) -> Iterator[Metric]:
    """The control loop's replicas and decisions, the replica-seconds held and the spend."""
    replicas = GaugeMetricFamily(
        "ensemble_autoscaler_replicas",
        "The control loop's view per member placement: replicas now (`current`) and the "
        "policy's target (`desired`, while it wants a change).",
        labels=["member", "tier", "kind"],
    )
    for member, tier, now, desired in list(m.autoscaler()):
        replicas.add_metric([member, tier, "current"], now)
        if desired is not None:
            replicas.add_metric([member, tier, "desired"], desired)
    yield replicas
    yield _counter(
        "ensemble_autoscaler_decisions",
        "Changes of a placement's desired replicas, by member, tier and direction (up, down).",
        ["member", "tier", "direction"],
        m.scaling_decisions.items(),
    )
    yield _counter(
        "ensemble_replica_seconds",
        "Replica-seconds held per member placement (sampled by the control loop).",
        ["member", "tier"],
        m.replica_seconds.items(),
    )
    yield _counter(
        "ensemble_spend",
        "Money spent per tier, in the config's currency: `replicas` (replica-seconds times "
        "the tier's cost_per_replica_hour / 3600) and `requests` (member calls times its "
        "cost_per_request, hedges and retries included).",
        ["tier", "kind"],
        m.spend.items(),
    )


def answer_families(m: GatewayMetrics) -> Iterator[Metric]:
    """What answers took beyond one call: hedges, retries, contracts not met, and the price."""
    yield _counter(
        "ensemble_hedges",
        "Hedged calls by member, tier (where the call was answered, or last tried) and outcome: "
        "sent (a second copy went out) and won (its answer was used).",
        ["member", "tier", "outcome"],
        m.hedges.items(),
    )
    yield _counter(
        "ensemble_retries",
        "Member calls re-sent to another replica or tier after a failure (failovers), by member "
        "and tier (where the call was answered, or last tried).",
        ["member", "tier"],
        m.retries.items(),
    )
    yield _counter(
        "ensemble_contract_violations",
        "Requests whose contract was not met, by kind (deadline, availability, accuracy, "
        "cost) and the profile's on_violation action (reject, degrade, reroute, alert).",
        ["ensemble", "kind", "action"],
        m.violations.items(),
    )
    yield _counter(
        "ensemble_degraded_answers",
        "Answers flagged degraded: partial, from the fallback member, or short of the contract.",
        ["ensemble"],
        _by_one(m.degraded),
    )
    yield _counter(
        "ensemble_cost",
        "Accumulated price of member calls (hedges and retries included), in the config's "
        "currency, by requested model.",
        ["model"],
        _by_one(m.cost),
    )


def replica_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Each replica's readiness, ejection by outlier detection, and restarts."""
    labels = ["member", "replica", "tier"]
    ready = GaugeMetricFamily(
        "ensemble_replica_ready",
        "1 while the replica can take calls (a remote one: its last health checks passed), else 0.",
        labels=labels,
    )
    ejected = GaugeMetricFamily(
        "ensemble_replica_ejected",
        "1 while outlier detection keeps the replica out of routing, else 0.",
        labels=labels,
    )
    ejections = CounterMetricFamily(
        "ensemble_replica_ejections",
        "Times outlier detection ejected the replica.",
        labels=labels,
    )
    restarts = CounterMetricFamily(
        "ensemble_replica_restarts",
        "Children a `process` replica started in place of one that died on its own (0 for "
        "other backends; a replica replaced by a reload or a scale-down starts over at 0).",
        labels=labels,
    )
    for member, replica, tier, is_ready, is_ejected, times, restarted in m.replicas():
        ready.add_metric([member, replica, tier], 1.0 if is_ready else 0.0)
        ejected.add_metric([member, replica, tier], 1.0 if is_ejected else 0.0)
        ejections.add_metric([member, replica, tier], times)
        restarts.add_metric([member, replica, tier], restarted)
    yield from (ready, ejected, ejections, restarts)


def config_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Config reloads, model files refused for their digest, and each model's readiness."""
    reloads = CounterMetricFamily(
        "ensemble_config_reloads",
        "Config reloads by outcome (success, failure: rejected, the old config kept serving).",
        labels=["outcome"],
    )
    for outcome in ("success", "failure"):
        reloads.add_metric([outcome], m.reloads.get(outcome, 0))
    yield reloads
    yield _counter(
        "ensemble_model_integrity_failures",
        "Model files refused because their SHA-256 does not match the member's card or "
        "config pin (or neither exists), by member: on a reload (the old config kept "
        "serving) or when a replica is added.",
        ["member"],
        _by_one(m.integrity_failures),
    )
    yield GaugeMetricFamily(
        "ensemble_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful config reload (0: none since start).",
        m.last_reload_success_s,
    )
    ready = GaugeMetricFamily(
        "ensemble_model_ready", "1 when the model can answer, else 0.", labels=["model"]
    )
    for model, is_ready in m.readiness().items():
        ready.add_metric([model], 1.0 if is_ready else 0.0)
    yield ready


def feedback_families(m: GatewayMetrics) -> Iterator[Metric]:
    """Feedback posts, the answers kept for them, and what the gateway learned from them."""
    yield _counter(
        "ensemble_feedback",
        "Feedback posts (true labels joined by feedback id) by ensemble and outcome "
        "(accepted, unknown_id, duplicate, invalid, unauthorized).",
        ["ensemble", "outcome"],
        m.feedback.items(),
    )
    entries, size = m.feedback_store()
    yield GaugeMetricFamily(
        "ensemble_feedback_store_answers",
        "Answers kept for feedback (at most server.feedback_window).",
        entries,
    )
    yield GaugeMetricFamily(
        "ensemble_feedback_store_bytes",
        "Memory the answers kept for feedback hold, estimated (at most server.feedback_max_bytes).",
        size,
    )
    accuracy = GaugeMetricFamily(
        "ensemble_member_rolling_accuracy",
        "Share of a member's last labelled rows it classified right (a sliding window of "
        "server.feedback_accuracy_window rows).",
        labels=["ensemble", "member"],
    )
    for pair, share in list(m.rolling_accuracy.items()):
        accuracy.add_metric(list(pair), share)
    yield accuracy
    weights = GaugeMetricFamily(
        "ensemble_selection_weight",
        "Member weight a selection profile learned from feedback (Exp4's, summing to 1).",
        labels=["ensemble", "profile", "member"],
    )
    for ensemble, profile, member, weight in m.selection_weights():
        weights.add_metric([ensemble, profile, member], weight)
    yield weights


def link_families(readings: Iterable[LinkReading]) -> Iterator[Metric]:
    """The emulated links: partitioned, delay, loss, failures and runtime changes per tier."""
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


def placement_families(placements: Iterable[tuple[str, PlacementView]]) -> Iterator[Metric]:
    """What selection expects of each (member, tier) now: latency, round trip, failures."""
    labels = ["member", "tier"]
    latency = GaugeMetricFamily(
        "ensemble_placement_expected_latency_seconds",
        "Expected latency of a call to the member on the tier now, by quantile (0.5, 0.95, "
        "0.99): the tier's round trip now plus recent calls' service times (the card's while "
        "the tier has had fewer than 8 calls in the last 30 s).",
        labels=[*labels, "quantile"],
    )
    trip = GaugeMetricFamily(
        "ensemble_placement_round_trip_seconds",
        "The network's share of a call: the tier's last health check's round trip, or its "
        "emulated link's delay both ways plus the last call's bytes at its bandwidth (0 in "
        "process without a link).",
        labels=labels,
    )
    errors = GaugeMetricFamily(
        "ensemble_placement_error_ratio",
        "Share of recent calls to the member on the tier that failed (older ones weigh less: "
        "a half-life of 10 s).",
        labels=labels,
    )
    samples = GaugeMetricFamily(
        "ensemble_placement_estimate_calls",
        "Recent calls the expected latency comes from (0: from the member card).",
        labels=labels,
    )
    for member, p in placements:
        for quantile, value in (
            ("0.5", p.latency_s),
            ("0.95", p.latency_p95_s),
            ("0.99", p.latency_p99_s),
        ):
            if value is not None:
                latency.add_metric([member, p.tier, quantile], value)
        trip.add_metric([member, p.tier], p.round_trip_s)
        errors.add_metric([member, p.tier], p.error_rate)
        samples.add_metric([member, p.tier], p.samples)
    yield from (latency, trip, errors, samples)
