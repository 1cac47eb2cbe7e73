"""One `/metrics` for a gateway of several workers: every worker's families, merged.

Counts add up (requests, calls, spend, latency buckets). State every worker holds the same copy
of (learned weights, link settings, config reloads, which each worker applies) is shown once.
Readiness is the weakest worker's: a model is ready when every worker can serve it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

SAME_IN_EVERY_WORKER = frozenset(
    {
        "ensemble_config_reloads",
        "ensemble_config_last_reload_success_timestamp_seconds",
        "ensemble_model_integrity_failures",
        "ensemble_link_changes",
        "ensemble_link_delay_seconds",
        "ensemble_link_loss_ratio",
        "ensemble_link_partitioned",
        "ensemble_member_rolling_accuracy",
        "ensemble_selection_weight",
        "ensemble_admission_limit",
        "ensemble_autoscaler_replicas",
        "ensemble_replica_ejected",
        "ensemble_placement_expected_latency_seconds",
        "ensemble_placement_round_trip_seconds",
        "ensemble_placement_error_ratio",
        "ensemble_placement_estimate_calls",
        "ensemble_input_drift",
        "ensemble_version_traffic_share",
        "ensemble_rollout_phase",
        "ensemble_rollout_latency_p95_seconds",
        "ensemble_rollout_labelled_rows",
        "ensemble_rollout_accuracy",
        "ensemble_rollout_agreement_ratio",
        "ensemble_rollout_decisions",
        "ensemble_split_expected_seconds",
        "ensemble_split_chosen",
        "python_info",
    }
)
"""Families whose value each worker holds a copy of: the largest is shown (a worker that just
restarted may still be behind). Placement estimates and input drift scores are each worker's
own, from its own calls and rows: the largest (the slowest, most failing, most drifted any
worker sees) is shown. Rollouts: every worker applies each decision and learns every label;
latency is each worker's own (the largest is shown), calls add up."""

WEAKEST_WORKER = frozenset({"ensemble_model_ready", "ensemble_replica_ready"})
"""Families shown as the smallest value of any worker."""

PER_WORKER_PREFIXES = ("process_", "python_gc_")
"""Families of each worker's own process (CPU, memory, descriptors, start time, garbage
collector): shown per worker, with a `worker` label, never added up."""


def _combine(name: str) -> Callable[[Iterable[float]], float]:
    if name in SAME_IN_EVERY_WORKER:
        return max
    if name in WEAKEST_WORKER:
        return min
    return sum


def merge(
    workers: Sequence[Sequence[Metric]], indexes: Sequence[int] | None = None
) -> list[Metric]:
    """Every worker's families (each from ``GatewayMetrics.collect``) as one set; the
    process families labelled with each worker's index (``indexes``, default 0, 1, ...)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for index, metrics in zip(indexes or range(len(workers)), workers, strict=True):
        for family in metrics:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            own = family.name.startswith(PER_WORKER_PREFIXES)
            for s in family.samples:
                tags = {**s.labels, "worker": str(index)} if own else s.labels
                samples.setdefault((s.name, tuple(sorted(tags.items()))), []).append(s.value)
    merged = []
    for name, family in families.items():
        combine = _combine(name)
        for (sample, labels), seen in values[name].items():
            family.add_sample(sample, dict(labels), float(combine(seen)))
        merged.append(family)
    return merged


class _Fixed:
    """A collector that yields families already built."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(families: list[Metric]) -> tuple[bytes, str]:
    """Body and content type of the Prometheus text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry), CONTENT_TYPE_LATEST
