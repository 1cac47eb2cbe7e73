"""Prometheus metrics of the gateway, one `ensemble_` prefix, units in names."""

from __future__ import annotations

from ensemble.metrics.gateway import GatewayMetrics
from ensemble.metrics.histogram import LATENCY_BUCKETS_S, Histogram

__all__ = ["LATENCY_BUCKETS_S", "GatewayMetrics", "Histogram"]
