"""Whether an ensemble's answer is uncertain, by the profile's thresholds: the ensemble's own
disagreement and entropy, and how far the input lies outside the training data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ensemble.config import UncertaintyConfig
from ensemble.types import Aggregate, MemberAnswer, Parameters
from policies.ensemble_math import disagreement, normalized_entropy


@dataclass(frozen=True, slots=True)
class Doubt:
    """One answer's uncertainty: each signal's worst row, and the verdict."""

    uncertain: bool
    entropy: float
    disagreement: float | None
    """None with fewer than two answers."""
    input_outliers: float | None
    """None when the ensemble's inputs are not watched."""

    def parameters(self, escalated: bool) -> Parameters:
        """What the answer says about it: ``uncertain``, the signals, ``escalated``."""
        params: Parameters = {"uncertain": self.uncertain, "entropy": round(self.entropy, 6)}
        if self.disagreement is not None:
            params["disagreement"] = round(self.disagreement, 6)
        if self.input_outliers is not None:
            params["input_outliers"] = round(self.input_outliers, 6)
        if escalated:
            params["escalated"] = True
        return params


def assess(
    config: UncertaintyConfig,
    agg: Aggregate,
    answers: Sequence[MemberAnswer],
    outliers: float | None,
) -> Doubt:
    """The answer's doubt against ``config``'s thresholds (a threshold not set is not
    checked; disagreement needs two answers)."""
    entropy = float(normalized_entropy(agg.probabilities).max())
    split = None
    if len(answers) >= 2:
        probabilities = [a.probabilities for a in answers]
        split = float(disagreement(probabilities, agg.class_index).max())
    uncertain = (
        (config.entropy is not None and entropy > config.entropy)
        or (config.disagreement is not None and split is not None and split > config.disagreement)
        or (
            config.input_outliers is not None
            and outliers is not None
            and outliers > config.input_outliers
        )
    )
    return Doubt(uncertain, entropy, split, outliers)
