"""Every metric family's HELP text lists the values its closed-set labels take (outcome, reason,
kind, stage, ...), so an operator reading `/metrics` or writing a query knows them all."""

from __future__ import annotations

import re

from ensemble.config import LinkConfig
from ensemble.errors import REJECTION_REASONS
from ensemble.metrics import GatewayMetrics
from ensemble.metrics.versions import VersionReading
from ensemble.replicas.links import Link

CLOSED = {
    "protocol",
    "outcome",
    "reason",
    "kind",
    "stage",
    "direction",
    "action",
    "decision",
    "phase",
    "escalated",
}
"""Labels whose values the gateway chooses (the others name models, members, tiers)."""


def populated() -> GatewayMetrics:
    """Metrics with every value of every closed-set label recorded once."""
    m = GatewayMetrics()
    for protocol in ("http", "grpc"):
        for outcome in ("success", "client_error", "server_error", "unavailable", "cancelled"):
            m.record_request("digits", protocol, outcome, 0.01)
        for reason in REJECTION_REASONS:
            m.record_rejection(protocol, reason)
        closes = ("limit", "evicted", "header_timeout", "header_too_large", "idle_timeout")
        for reason in (*closes, "write_timeout"):
            m.record_connection_closed(protocol, reason)
    for outcome in ("success", "error", "timeout"):
        m.record_member_call("logreg", "edge", outcome, 0.001)
    m.record_run("logreg", "edge", [0.0001, 0.0003], 0.0002)
    m.record_link("logreg", "cloud", 0.04)
    link = Link("cloud", LinkConfig(emulate=True))
    m.links = lambda: [link.reading()]  # every kind of failure the link counts
    for escalated in (True, False):
        m.record_uncertain("digits", escalated)
    for won in (True, False):
        m.record_hedge("logreg", "edge", won)
    for action in ("reject", "degrade", "reroute", "alert"):
        m.record_violations("digits", ["deadline", "availability", "accuracy", "cost"], action)
    for outcome in ("success", "failure"):
        m.record_reload(outcome)
    for outcome in ("accepted", "unknown_id", "duplicate", "invalid", "unauthorized"):
        m.record_feedback("digits", outcome)
    for reason in ("full", "evicted", "deadline"):
        m.shed[reason] += 1
    for direction in ("up", "down"):
        m.scaling_decisions[("logreg", "edge", direction)] += 1
    for kind in ("replicas", "requests"):
        m.spend[("cloud", kind)] += 1.0
    m.versions = lambda: [
        VersionReading(
            "clf", "2", 0.1, phase, 10, 1, 0.01, 5, 0.9, 0.95, (("promote", 1), ("rollback", 1))
        )
        for phase in ("running",)
    ]
    return m


def test_every_closed_label_value_is_in_its_familys_help() -> None:
    missing = []
    seen = set()
    for family in populated().collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label not in CLOSED:
                    continue
                seen.add((family.name, label))
                shown = {"True": "yes", "False": "no"}.get(value, value)
                if not re.search(rf"(?<![\w]){re.escape(shown)}(?![\w])", family.documentation):
                    missing.append(f"{family.name}: {label}={value}")
    assert not missing, "\n".join(missing)
    # The check saw the families that have such labels.
    for name, label in (
        ("ensemble_requests", "outcome"),
        ("ensemble_requests", "protocol"),
        ("ensemble_member_stage_duration_seconds", "stage"),
        ("ensemble_autoscaler_decisions", "direction"),
        ("ensemble_rollout_phase", "phase"),
        ("ensemble_rollout_decisions", "decision"),
        ("ensemble_spend", "kind"),
        ("ensemble_member_calls", "outcome"),
        ("ensemble_link_failures", "kind"),
    ):
        assert (name, label) in seen, (name, label)
