"""A training split's input distribution, for a member card: per-feature deciles as bins."""

from __future__ import annotations

import numpy as np

from ensemble.models.card import InputReference

BINS = 10


def input_reference(name: str, x: np.ndarray) -> InputReference:
    """The per-feature distribution of training inputs ``x`` ([N, F]): inner edges at the
    deciles (repeated ones dropped, so a constant feature has one edge and two bins) and the
    training share in each bin."""
    x = np.asarray(x, dtype=np.float64)
    edges, proportions = [], []
    for column in x.T:
        inner = np.unique(np.quantile(column, np.arange(1, BINS) / BINS))
        counts = np.bincount(np.searchsorted(inner, column, side="left"), minlength=len(inner) + 1)
        edges.append([round(float(e), 6) for e in inner])
        proportions.append([round(float(c) / len(column), 6) for c in counts])
    return InputReference(
        input=name,
        edges=edges,
        proportions=proportions,
        low=[float(v) for v in x.min(axis=0)],
        high=[float(v) for v in x.max(axis=0)],
        rows=len(x),
    )
