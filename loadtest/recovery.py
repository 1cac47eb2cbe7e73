"""How a run went through one fault: shares, latency in and around its window, time to recover.

Pure functions of the per-request records (no I/O), so the definitions are unit-tested exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.runner import OK, Records


@dataclass(frozen=True)
class RecoveryRule:
    """When answers count as back to normal after a fault."""

    window: int = 20
    """Consecutive requests (in send order) that must all be normal."""
    latency_factor: float = 2.0
    """A normal answer is at most this times the pre-fault p99 late..."""
    min_threshold_ms: float = 10.0
    """... or this many ms, whichever is more (a quiet baseline's p99 is a few ms)."""
    baseline_from_s: float = 1.0
    """The baseline is requests sent from here until the fault starts (skips the first ones)."""


@dataclass(frozen=True)
class Columns:
    """The records as numpy columns, in send order."""

    intended: np.ndarray
    latency_ms: np.ndarray
    ok: np.ndarray
    degraded: np.ndarray
    kind: np.ndarray
    kinds: list[str]

    @classmethod
    def of(cls, rec: Records) -> Columns:
        intended = np.frombuffer(rec.intended, dtype=np.float64)
        order = np.argsort(intended, kind="stable")
        kind = np.frombuffer(rec.kind, dtype=np.int8)[order]
        ok = kind == rec.kinds.index(OK)
        degraded = np.frombuffer(rec.degraded, dtype=np.int8)[order].astype(bool) & ok
        latency = np.frombuffer(rec.latency, dtype=np.float64)[order] * 1000
        return cls(intended[order], latency, ok, degraded, kind, list(rec.kinds))


def _pct(values: np.ndarray, q: float) -> float | None:
    if values.size == 0:
        return None
    return round(float(np.percentile(values, q, method="inverted_cdf")), 3)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def stats(cols: Columns, mask: np.ndarray) -> dict[str, Any]:
    """Requests sent, answered (HTTP 200 / gRPC OK), degraded, errors by kind, p50/p99 of the
    answered, for the requests ``mask`` selects."""
    sent = int(mask.sum())
    answered = int((mask & cols.ok).sum())
    degraded = int((mask & cols.degraded).sum())
    errors = {
        name: int((mask & (cols.kind == code)).sum())
        for code, name in enumerate(cols.kinds)
        if name != OK and (mask & (cols.kind == code)).any()
    }
    lat = cols.latency_ms[mask & cols.ok]
    return {
        "sent": sent,
        "answered": answered,
        "answered_share": _share(answered, sent),
        "degraded": degraded,
        "degraded_share": _share(degraded, sent),
        "errors": errors,
        "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "max": _pct(lat, 100)},
    }


def threshold_ms(baseline_p99_ms: float | None, rule: RecoveryRule) -> float:
    """The latency a normal answer stays under."""
    if baseline_p99_ms is None:
        return rule.min_threshold_ms
    return max(rule.latency_factor * baseline_p99_ms, rule.min_threshold_ms)


def recovery_s(cols: Columns, end_s: float, limit_ms: float, window: int) -> float | None:
    """Seconds from ``end_s`` to the intended send time of the first request of the first run
    of ``window`` consecutive requests (in send order, all sent at or after ``end_s``) that were
    each answered, not degraded, and within ``limit_ms``. None if no such run exists."""
    after = np.flatnonzero(cols.intended >= end_s)
    normal = cols.ok & ~cols.degraded & (cols.latency_ms <= limit_ms)
    run = 0
    for n, i in enumerate(after):
        run = run + 1 if normal[i] else 0
        if run >= window:
            first = after[n - window + 1]
            return round(float(cols.intended[first]) - end_s, 3)
    return None


def analyse(rec: Records, start_s: float, end_s: float, rule: RecoveryRule) -> dict[str, Any]:
    """The whole run, the baseline before the fault, the fault window [start_s, end_s), the
    time to recover after it, all from the per-request records."""
    cols = Columns.of(rec)
    everything = np.ones_like(cols.ok)
    before = (cols.intended >= rule.baseline_from_s) & (cols.intended < start_s)
    during = (cols.intended >= start_s) & (cols.intended < end_s)
    baseline = stats(cols, before)
    limit = threshold_ms(baseline["latency_ms"]["p99"], rule)
    return {
        "run": stats(cols, everything),
        "baseline": baseline,
        "window": {"start_s": round(start_s, 3), "end_s": round(end_s, 3), **stats(cols, during)},
        "after": stats(cols, cols.intended >= end_s),
        "threshold_ms": round(limit, 3),
        "recovery_s": recovery_s(cols, end_s, limit, rule.window),
    }
