"""Watching an ensemble's inputs against its training distribution, in the serving path:
per request, the share of features outside the training range; over a window of rows, a drift
score (the mean per-feature PSI against the member card's deciles), logged when it crosses
its threshold either way.

The cost on the request path is one copy of the request's rows into a ring (a whole-window
histogram and PSI run once per window: about half a millisecond for 500 rows of 64 features).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

from ensemble.models.card import InputReference
from ensemble.types import TensorSpec

log = logging.getLogger("ensemble.drift")

SMOOTHING = 1e-4
"""Shares are floored at this before the PSI's logarithm (an empty bin is not infinite)."""


class InputWatch:
    """One ensemble's input watch: a ring of the last ``window`` rows and the drift score of
    the last full window. Event-loop thread only."""

    def __init__(
        self,
        ensemble: str,
        reference: InputReference,
        *,
        window: int = 500,
        threshold: float = 0.2,
        on_score: Callable[[str, float], None] | None = None,
    ) -> None:
        self.ensemble = ensemble
        self.window = window
        self.threshold = threshold
        self.on_score = on_score
        width = len(reference.edges)
        longest = max(len(e) for e in reference.edges)
        # Edges padded with +inf: a padded edge is never below a value, so counting the edges
        # below a value gives its bin on every feature at once.
        self._edges = np.full((width, max(longest, 1)), np.inf)
        for i, e in enumerate(reference.edges):
            self._edges[i, : len(e)] = e
        self._expected = np.full((width, longest + 1), np.nan)
        for i, p in enumerate(reference.proportions):
            self._expected[i, : len(p)] = p
        self._low = np.asarray(reference.low)
        self._high = np.asarray(reference.high)
        self._rows = np.zeros((window, width), dtype=np.float32)
        self._filled = 0
        self.score: float | None = None
        """Mean PSI over the features in the last full window; None before one."""
        self.drifting = False
        """Whether the last score was at or above the threshold."""
        self.windows = 0

    def carry(self, earlier: InputWatch) -> None:
        """Continue ``earlier``'s window and score (a reload), when it watched the same
        features against the same reference over a window as long; otherwise start afresh."""
        same = (
            earlier.window == self.window
            and np.array_equal(earlier._edges, self._edges)
            and np.array_equal(earlier._expected, self._expected, equal_nan=True)
        )
        if not same:
            return
        self._rows[:] = earlier._rows
        self._filled = earlier._filled
        self.score, self.drifting, self.windows = earlier.score, earlier.drifting, earlier.windows

    @property
    def width(self) -> int:
        return int(self._low.shape[0])

    def outliers(self, rows: np.ndarray) -> float:
        """The largest share, over ``rows``, of a row's features outside the training range."""
        out = (rows < self._low) | (rows > self._high)
        return float(out.mean(axis=1).max()) if rows.size else 0.0

    def observe(self, rows: np.ndarray) -> None:
        """Take a request's rows ([batch, features]); score the window when it fills."""
        rows = rows.reshape(len(rows), -1)
        while len(rows):
            take = min(len(rows), self.window - self._filled)
            self._rows[self._filled : self._filled + take] = rows[:take]
            self._filled += take
            rows = rows[take:]
            if self._filled == self.window:
                self._filled = 0
                self._score(psi(self._rows, self._edges, self._expected))

    def _score(self, score: float) -> None:
        self.score = score
        self.windows += 1
        drifting = score >= self.threshold
        if drifting != self.drifting:
            self.drifting = drifting
            if drifting:
                log.warning(
                    "ensemble %s: input drift %.3f >= %.3f over the last %d rows",
                    self.ensemble,
                    score,
                    self.threshold,
                    self.window,
                )
            else:
                log.info(
                    "ensemble %s: input drift back to %.3f (< %.3f)",
                    self.ensemble,
                    score,
                    self.threshold,
                )
        if self.on_score is not None:
            self.on_score(self.ensemble, score)


def psi(rows: np.ndarray, edges: np.ndarray, expected: np.ndarray) -> float:
    """Mean over features of the population stability index of ``rows`` ([N, F]) against the
    ``expected`` shares per bin ([F, B], NaN past a feature's bins), binned by ``edges``
    ([F, B-1], +inf padded): sum over bins of (actual - expected) * ln(actual / expected)."""
    width, slots = expected.shape
    # A row's bin is the number of its feature's edges below it: one [N, F] comparison per
    # edge (a single [N, F, B-1] one and np.add.at cost three times as much).
    values = rows.astype(np.float64)
    bins = np.zeros(values.shape, dtype=np.intp)
    for edge in edges.T:
        bins += values > edge
    counts = np.bincount((bins + np.arange(width) * slots).ravel(), minlength=width * slots)
    actual = np.maximum(counts.reshape(width, slots) / len(rows), SMOOTHING)
    known = ~np.isnan(expected)
    wanted = np.maximum(np.where(known, expected, 1.0), SMOOTHING)
    terms = np.where(known, (actual - wanted) * np.log(actual / wanted), 0.0)
    return float(terms.sum(axis=1).mean())


def watch_for(
    ensemble: str,
    spec: TensorSpec,
    references: Iterable[InputReference | None],
    *,
    window: int,
    threshold: float,
) -> InputWatch | None:
    """A watch on the ensemble's input ``spec`` (one [batch, features] tensor) from the first
    member card whose reference describes as many features; None when none does."""
    if len(spec.shape) != 2:
        return None
    for ref in references:
        if ref is not None and len(ref.edges) == spec.shape[1]:
            return InputWatch(ensemble, ref, window=window, threshold=threshold)
    return None
