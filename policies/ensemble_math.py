"""Ensemble arithmetic shared by policies: subset accuracy, ROHE bounds, vote tallies."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ensemble.types import MemberView, ValidationSet

_CACHE_SETS = 4
"""Validation sets whose subset accuracies are kept; a config reload brings a new one."""

# id(validation) -> (the set itself, {subset: accuracy}). Holding the set keeps its id from
# being reused by a new object while the entry lives, so a stale hit is impossible.
_subset_cache: OrderedDict[int, tuple[ValidationSet, dict[frozenset[str], float]]] = OrderedDict()


def subset_accuracy(validation: ValidationSet, members: Iterable[str]) -> float:
    """Exact accuracy of the mean-probability ensemble of ``members`` on ``validation``.

    Cached per (validation set, subset): slo_greedy asks for up to 2^n subsets per request.
    Raises KeyError when a member has no answers in the validation set.
    """
    subset = frozenset(members)
    if not subset:
        raise ValueError("the empty subset has no accuracy")
    entry = _subset_cache.get(id(validation))
    if entry is None or entry[0] is not validation:
        entry = (validation, {})
        _subset_cache[id(validation)] = entry
        while len(_subset_cache) > _CACHE_SETS:
            _subset_cache.popitem(last=False)
    _subset_cache.move_to_end(id(validation))
    accuracies = entry[1]
    cached = accuracies.get(subset)
    if cached is not None:
        return cached
    names = sorted(subset)
    total = np.array(validation.probabilities[names[0]], dtype=np.float64)
    for name in names[1:]:
        total += validation.probabilities[name]
    # The sum and the mean have the same argmax, so no division is needed.
    accuracy = float(np.mean(total.argmax(axis=1) == validation.labels)) if len(total) else 0.0
    accuracies[subset] = accuracy
    return accuracy


def at_least_one_correct(accuracies: Iterable[float]) -> float:
    """ROHE's probability that at least one member is right, 1 - prod(1 - acc_i).

    An upper bound on any aggregation's accuracy that assumes independent errors; optimistic.
    """
    miss = 1.0
    for accuracy in accuracies:
        miss *= 1.0 - min(max(accuracy, 0.0), 1.0)
    return 1.0 - miss


def estimated_accuracy(
    members: Sequence[MemberView],
    validation: ValidationSet | None,
    fallback: str = "max_member",
) -> float:
    """Expected accuracy of the mean-probability ensemble of ``members``.

    Exact from ``validation`` when it holds every member's answers; otherwise ``fallback``:
    ``max_member`` (the best member's card accuracy: averaging rarely beats the best member by
    much, and never needs independence) or ``at_least_one`` (ROHE's optimistic bound). A member
    without a card counts as accuracy 0.
    """
    if validation is not None and all(m.name in validation.probabilities for m in members):
        return subset_accuracy(validation, (m.name for m in members))
    accuracies = [m.accuracy if m.accuracy is not None else 0.0 for m in members]
    if fallback == "at_least_one":
        return at_least_one_correct(accuracies)
    return max(accuracies, default=0.0)


def majority_quorum(n_members: int) -> int:
    """Cocktail's quorum ceil(0.51 N): the votes a winner needs to be a clear majority."""
    return math.ceil(0.51 * n_members)


def tally(
    top_classes: Mapping[str, np.ndarray],
    n_classes: int,
    weight: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Votes [batch, n_classes]: each member adds its weight to its top class per row.

    ``top_classes`` maps member -> [batch] class indices; ``weight`` maps member -> per-class
    weights [n_classes] (1 for every class when absent).
    """
    batch = len(next(iter(top_classes.values())))
    votes = np.zeros((batch, n_classes), dtype=np.float64)
    rows = np.arange(batch)
    for member, classes in top_classes.items():
        w = weight[member][classes] if weight is not None else 1.0
        np.add.at(votes, (rows, classes), w)
    return votes


def mean_top_confidence(probabilities: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its probability per row of the answers' mean probabilities."""
    mean = np.mean(np.stack(probabilities), axis=0)
    winner = mean.argmax(axis=1)
    return winner, mean[np.arange(mean.shape[0]), winner]


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per row, the entropy of a [batch, classes] probability matrix as a share of its
    maximum, log(classes): 0 for a one-hot row, 1 for a uniform one."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    classes = p.shape[1]
    if classes < 2:
        return np.zeros(p.shape[0])
    out: np.ndarray = -(p * np.log(p)).sum(axis=1) / np.log(classes)
    return out


def disagreement(probabilities: Sequence[np.ndarray], winner: np.ndarray) -> np.ndarray:
    """Per row, the share of the answers (each [batch, classes]) whose top class is not
    ``winner``'s (the combined answer's class index per row)."""
    tops = np.stack([np.asarray(p).argmax(axis=1) for p in probabilities])
    out: np.ndarray = (tops != np.asarray(winner)[None, :]).mean(axis=0)
    return out
