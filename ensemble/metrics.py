"""Prometheus metrics of the gateway (prometheus-client), one `ensemble_` prefix, units in names."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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


class GatewayMetrics:
    """The gateway's metric families, in a registry of their own (tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ensemble_requests",
            "Inference requests by model, protocol and outcome "
            "(success, client_error, server_error, unavailable).",
            ["model", "protocol", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "ensemble_request_duration_seconds",
            "End-to-end inference latency inside the gateway, by model and protocol.",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.member_latency = Histogram(
            "ensemble_member_call_duration_seconds",
            "Latency of one call to a member replica, by member and tier.",
            ["member", "tier"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.member_calls = Counter(
            "ensemble_member_calls",
            "Calls to member replicas by member, tier and outcome (success, error).",
            ["member", "tier", "outcome"],
            registry=r,
        )
        self.members_asked = Counter(
            "ensemble_members_asked",
            "Members asked to answer, summed over requests, by ensemble.",
            ["ensemble"],
            registry=r,
        )
        self.members_answered = Counter(
            "ensemble_members_answered",
            "Members whose answer was aggregated, summed over requests, by ensemble.",
            ["ensemble"],
            registry=r,
        )
        self.inflight = Gauge(
            "ensemble_inflight_requests",
            "Inference requests being processed now.",
            registry=r,
        )
        self.model_ready = Gauge(
            "ensemble_model_ready",
            "1 when the model can answer, else 0.",
            ["model"],
            registry=r,
        )

        # labels() costs a lock and a dict build per call; the request path records through
        # these caches of label children instead.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._call_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def record_request(self, model: str, protocol: str, outcome: str, seconds: float) -> None:
        """Count one finished request; latency is recorded for known models only."""
        key = (model, protocol, outcome)
        children = self._request_children.get(key)
        if children is None:
            latency = self.request_latency.labels(model, protocol) if model else None
            children = (self.requests.labels(model, protocol, outcome), latency)
            self._request_children[key] = children
        children[0].inc()
        if children[1] is not None:
            children[1].observe(seconds)

    def record_member_call(self, member: str, tier: str, outcome: str, seconds: float) -> None:
        """Count one call to a member replica and its latency."""
        key = (member, tier, outcome)
        children = self._call_children.get(key)
        if children is None:
            children = (
                self.member_calls.labels(member, tier, outcome),
                self.member_latency.labels(member, tier),
            )
            self._call_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
