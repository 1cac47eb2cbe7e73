"""How an ensemble's requests and answers map onto a member that differs from it: its own
input names and datatypes, its own class labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ensemble.model_checks import class_columns, input_pairs
from ensemble.oip.datatypes import OIP_TO_NUMPY
from ensemble.types import ClassLabel, TensorSpec


@dataclass(frozen=True, slots=True)
class MemberAdapter:
    """``inputs``: per member input, (its name, the ensemble input it takes, the numpy dtype
    to convert to or None); ``columns``: per member class, the ensemble class index it stands
    for (None: the same classes in the same order)."""

    inputs: tuple[tuple[str, str, np.dtype | None], ...]
    columns: np.ndarray | None
    n_classes: int

    @property
    def plain(self) -> bool:
        """Nothing to map: the member takes the ensemble's inputs and answers its classes."""
        return self.columns is None and all(
            theirs == ours and cast is None for theirs, ours, cast in self.inputs
        )

    def feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ensemble's feed as the member takes it (renamed, converted)."""
        return {
            theirs: feed[ours] if cast is None else feed[ours].astype(cast)
            for theirs, ours, cast in self.inputs
        }

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        """The member's class probabilities in the ensemble's class order (classes it does not
        know: 0; several of its classes for one ensemble class: their sum)."""
        columns = self.columns
        if columns is None:
            return probabilities
        out = np.zeros((probabilities.shape[0], self.n_classes), dtype=probabilities.dtype)
        np.add.at(out.T, columns, probabilities.T)
        return out


def adapter(
    where: str,
    inputs: Sequence[TensorSpec],
    classes: Sequence[ClassLabel],
    ensemble_inputs: Sequence[TensorSpec],
    ensemble_classes: Sequence[ClassLabel],
    input_map: Mapping[str, str] | None,
    class_map: Mapping[str, int | str] | None,
) -> MemberAdapter:
    """The member's adapter (``where``: its place in the config, for errors): inputs by
    ``input_map`` (member name -> ensemble name) or by position, converted when datatypes
    differ (numbers to numbers); classes by ``class_map`` (member label as text -> ensemble
    label) or equal to the ensemble's. EnsembleError names what does not fit."""
    mapped = [
        (
            own.name,
            target.name,
            None if own.datatype == target.datatype else np.dtype(OIP_TO_NUMPY[own.datatype]),
        )
        for own, target in input_pairs(where, inputs, ensemble_inputs, input_map)
    ]
    return MemberAdapter(
        tuple(mapped),
        _array(class_columns(where, classes, ensemble_classes, class_map)),
        len(ensemble_classes),
    )


def _array(columns: list[int] | None) -> np.ndarray | None:
    return None if columns is None else np.asarray(columns, dtype=np.intp)
