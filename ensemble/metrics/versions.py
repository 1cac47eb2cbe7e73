"""Metric families of members' versions and rollouts (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PHASES = ("running", "promoted", "rolled_back")


@dataclass(frozen=True, slots=True)
class VersionReading:
    """One served version of a member, and its rollout's evidence when it is in one."""

    member: str
    version: str
    share: float
    """Share of the member's unversioned calls it answers now."""
    phase: str | None = None
    """Its rollout's phase (None: not the candidate or stable of a rollout)."""
    calls: int = 0
    errors: int = 0
    latency_p95_s: float | None = None
    labelled: int = 0
    accuracy: float | None = None
    agreement: float | None = None
    decisions: tuple[tuple[str, int], ...] = ()
    """(promote | rollback, how many) decided about it as a candidate."""


def version_families(readings: Iterable[VersionReading]) -> Iterator[Metric]:
    """Traffic share per version; each rollout's phase, evidence and decisions."""
    labels = ["member", "version"]
    share = GaugeMetricFamily(
        "ensemble_version_traffic_share",
        "Share of the member's unversioned calls the version answers now (1 for the serving "
        "version, the canary's weight while a canary runs; 0 for a rolled back candidate).",
        labels=labels,
    )
    phase = GaugeMetricFamily(
        "ensemble_rollout_phase",
        "1 for the phase the rollout the version takes part in is in (running, promoted, "
        "rolled_back), by member, version and phase.",
        labels=[*labels, "phase"],
    )
    calls = GaugeMetricFamily(
        "ensemble_rollout_calls",
        "Calls of the version since its rollout began, by outcome (success, error): the "
        "evidence its error rate is judged on.",
        labels=[*labels, "outcome"],
    )
    latency = GaugeMetricFamily(
        "ensemble_rollout_latency_p95_seconds",
        "p95 latency of the version's recent successful calls in its rollout.",
        labels=labels,
    )
    labelled = GaugeMetricFamily(
        "ensemble_rollout_labelled_rows",
        "Rows the version answered that feedback labelled, since its rollout began.",
        labels=labels,
    )
    accuracy = GaugeMetricFamily(
        "ensemble_rollout_accuracy",
        "Share of the version's labelled rows it answered right, in its rollout.",
        labels=labels,
    )
    agreement = GaugeMetricFamily(
        "ensemble_rollout_agreement_ratio",
        "Share of rows where a shadow version's top class equalled the serving version's.",
        labels=labels,
    )
    decided = CounterMetricFamily(
        "ensemble_rollout_decisions",
        "Rollout decisions about a candidate version (promote, rollback), on evidence or by "
        "the admin API.",
        labels=[*labels, "decision"],
    )
    for r in readings:
        key = [r.member, r.version]
        share.add_metric(key, r.share)
        if r.phase is None:
            continue
        for name in PHASES:
            phase.add_metric([*key, name], 1.0 if name == r.phase else 0.0)
        calls.add_metric([*key, "success"], r.calls - r.errors)
        calls.add_metric([*key, "error"], r.errors)
        labelled.add_metric(key, r.labelled)
        for family, value in ((latency, r.latency_p95_s), (accuracy, r.accuracy)):
            if value is not None:
                family.add_metric(key, value)
        if r.agreement is not None:
            agreement.add_metric(key, r.agreement)
        for decision, count in r.decisions:
            decided.add_metric([*key, decision], count)
    yield from (share, phase, calls, latency, labelled, accuracy, agreement, decided)
