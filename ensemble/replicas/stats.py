"""Live per-replica load and latency: what routing and hedging policies decide on."""

from __future__ import annotations

from array import array

from policies.base import BreakerState

HEALTHY = BreakerState()
"""The breaker state of a replica with no recent failure (shared: states are immutable)."""

WINDOW = 128
"""Latencies kept per replica for its p95 (recent behaviour, bounded memory)."""
EWMA_ALPHA = 0.3


class ReplicaStats:
    """Calls in flight, a latency EWMA and a recent-latency window; event-loop thread only."""

    __slots__ = (
        "_fast",
        "_p95",
        "_since_p95",
        "_window",
        "breaker",
        "calls",
        "ejections",
        "ewma_s",
        "failures",
        "measured_at",
        "outstanding",
        "ready",
    )

    def __init__(self) -> None:
        self.outstanding = 0
        self.calls = 0
        """Calls started, ever (the control loop turns it into a rate)."""
        self.ewma_s: float | None = None
        self.measured_at: float | None = None
        """When a latency last went into the EWMA (the member's clock; None before any)."""
        self.failures = 0
        self._window = array("d")
        self._p95: float | None = None
        self._fast: float | None = None
        self._since_p95 = 0
        self.breaker = HEALTHY
        """Outlier detection's state for this replica."""
        self.ejections = 0
        """Times outlier detection ejected this replica."""
        self.ready = True
        """Its readiness when last looked at (a change back to ready clears an ejection)."""

    def started(self) -> None:
        self.outstanding += 1
        self.calls += 1

    def finished(
        self, latency_s: float, ok: bool, *, abandoned: bool = False, now: float | None = None
    ) -> None:
        """A call ended (at ``now``, on the member's clock). ``abandoned``: cancelled unanswered
        (a hedge's loser, a request past its deadline): no failure, but its time so far is a
        lower bound of its latency, kept when it exceeds the EWMA so that hedging does not hide
        a slow replica from routing."""
        self.outstanding -= 1
        if abandoned:
            if self.ewma_s is not None and latency_s > self.ewma_s:
                self._record(latency_s, now)
            return
        if not ok:
            self.failures += 1
            return  # a fast failure must not make a broken replica look attractive
        self._record(latency_s, now)

    def _record(self, latency_s: float, now: float | None) -> None:
        self.measured_at = now
        self.ewma_s = (
            latency_s
            if self.ewma_s is None
            else self.ewma_s + EWMA_ALPHA * (latency_s - self.ewma_s)
        )
        if len(self._window) < WINDOW:
            self._window.append(latency_s)
        else:
            self._window[self._since_p95 % WINDOW] = latency_s
        self._since_p95 += 1
        if self._p95 is None or self._since_p95 % 16 == 0:
            # Recomputed lazily: sorting on every call would cost the hot path.
            self._p95 = self._fast = None

    @property
    def p95_s(self) -> float | None:
        if self._p95 is None:
            self._p95 = self.p95_of_last(WINDOW)
        return self._p95

    @property
    def recorded(self) -> int:
        """Latencies recorded, ever (the control loop tells recent ones from older by it)."""
        return self._since_p95

    def p95_of_last(self, n: int) -> float | None:
        """The p95 of the last ``n`` latencies recorded (at least 8, at most the window's):
        the control loop's p95 over its own window, which forgets a burst as soon as the
        window does rather than 128 calls later. None before 8 calls, as ``p95_s``."""
        window, size = self._window, len(self._window)
        if size < 8:
            return None
        k = min(size, max(8, n))
        if size < WINDOW:  # not wrapped yet: the newest are at the end
            last = list(window[size - k :])
        else:
            last = [window[(self._since_p95 - 1 - i) % WINDOW] for i in range(k)]
        last.sort()
        return last[min(k - 1, int(0.95 * k))]

    @property
    def fast_s(self) -> float | None:
        """The 10th percentile of recent latencies: about the service time of a call that met
        no queue (the control loop's estimate of what one replica can do)."""
        if self._fast is None and len(self._window) >= 8:
            self._fast = sorted(self._window)[len(self._window) // 10]
        return self._fast
