"""Answers kept for feedback: unguessable ids, predicted classes only, bounded in bytes."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ensemble.types import MemberAnswer

T = TypeVar("T", bound=tuple[Any, ...])

DEFAULT_WINDOW = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

FEEDBACK_ID_BYTES = 16
"""Random bytes in a feedback id (128 bits from ``secrets``): ids cannot be guessed or replayed
across answers, so a label joins only the answer its id was issued with."""

ENTRY_OVERHEAD_BYTES = 400
"""Memory one remembered answer takes besides its array's data: the id string, the entry
object, the array's header, the dict's and the eviction queue's slots. tracemalloc measures
320-350 bytes on CPython 3.11 (the rest is allocator slack); a unit test checks the estimate
never falls below the measurement."""

_MAX_SHARED_NAMES = 1024
"""Distinct member-name tuples shared between entries before the cache starts over."""


def mint_feedback_id() -> str:
    """A new feedback id: 22 URL-safe characters."""
    return secrets.token_urlsafe(FEEDBACK_ID_BYTES)


def class_dtype(n_classes: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned integer type that holds every class index (uint8 up to 256)."""
    dtype: np.dtype[np.unsignedinteger] = np.min_scalar_type(max(n_classes - 1, 0))
    return dtype


@dataclass(slots=True)
class Answered:
    """What one ensemble answer leaves for a later label: the selection policies and the
    rolling accuracy only ever compare a member's top class with the true class, so each
    answering member's predicted class per row is all that is kept, never its probabilities."""

    ensemble: str
    profile: str
    asked: tuple[str, ...]
    members: tuple[str, ...]
    """Members that answered, in the row order of ``predicted``."""
    predicted: np.ndarray | None
    """[members, batch] class indices (the argmax of each member's probabilities) in the
    smallest unsigned type that holds them; None once a label was accepted."""
    batch: int
    n_classes: int
    """Width of the widest answer's probabilities (what Cocktail's vote is sized by)."""
    versions: tuple[tuple[str, str], ...] = ()
    """(member, version) for members serving several versions (their rollouts' evidence)."""

    @classmethod
    def of(
        cls, ensemble: str, profile: str, asked: tuple[str, ...], answers: Sequence[MemberAnswer]
    ) -> Answered:
        n_classes = max((int(a.probabilities.shape[1]) for a in answers), default=0)
        batch = int(answers[0].probabilities.shape[0]) if answers else 0
        predicted = np.empty((len(answers), batch), dtype=class_dtype(n_classes))
        for row, answer in enumerate(answers):
            predicted[row] = np.asarray(answer.probabilities).argmax(axis=1)
        members = tuple(a.member for a in answers)
        versions = tuple((a.member, a.version) for a in answers if a.version is not None)
        return cls(ensemble, profile, asked, members, predicted, batch, n_classes, versions)

    @property
    def joined(self) -> bool:
        """A label was accepted for it (a second one is a 409)."""
        return self.predicted is None

    @property
    def nbytes(self) -> int:
        """Memory it holds: the predicted classes' bytes plus the fixed per-entry estimate."""
        data = self.predicted.nbytes if self.predicted is not None else 0
        return ENTRY_OVERHEAD_BYTES + data


class AnswerStore:
    """Recent answers by feedback id, oldest evicted first, at most ``capacity`` of them and
    ``max_bytes`` of memory all together.

    A queue of ids keeps insertion order, so evicting the oldest is O(1) (popping a dict's first
    key scans the slots earlier evictions left empty). Member-name tuples are shared between
    entries, so an entry costs its array and a fixed overhead; ``nbytes`` is the running sum of
    the entries' ``nbytes``. Runs on the event loop only (no locks).
    """

    def __init__(self, capacity: int = DEFAULT_WINDOW, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_bytes < ENTRY_OVERHEAD_BYTES:
            raise ValueError(f"max_bytes must be at least {ENTRY_OVERHEAD_BYTES}, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: dict[str, Answered] = {}
        self._order: deque[str] = deque()
        self._names: dict[Any, Any] = {}
        """Tuples of names entries share (a few combinations recur)."""
        self.prefix = ""
        """Put before every id minted: a gateway worker's ``"<index>."``, so a label that
        reaches another worker finds the one that keeps its answer."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, feedback_id: object) -> bool:
        return feedback_id in self._entries

    def get(self, feedback_id: str) -> Answered | None:
        return self._entries.get(feedback_id)

    def remember(self, entry: Answered) -> str:
        """Keep ``entry`` under a new feedback id, evicting the oldest as needed; the id.

        An entry larger than the whole budget is not kept (its label will find nothing: 404).
        """
        feedback_id = self.prefix + mint_feedback_id()
        size = entry.nbytes
        if size > self.max_bytes:
            return feedback_id
        entries, order = self._entries, self._order
        while entries and (len(entries) >= self.capacity or self.nbytes + size > self.max_bytes):
            self.nbytes -= entries.pop(order.popleft()).nbytes
        entry.asked = self._shared(entry.asked)
        entry.members = self._shared(entry.members)
        entry.versions = self._shared(entry.versions)
        entries[feedback_id] = entry
        order.append(feedback_id)
        self.nbytes += size
        return feedback_id

    def settle(self, feedback_id: str) -> np.ndarray:
        """Mark the entry joined and hand over its predicted classes (its bytes are freed; the
        entry stays, so a second label is recognised). KeyError if unknown or joined."""
        entry = self._entries[feedback_id]
        predicted = entry.predicted
        if predicted is None:
            raise KeyError(feedback_id)
        entry.predicted = None
        self.nbytes -= predicted.nbytes
        return predicted

    def _shared(self, names: T) -> T:
        shared: T | None = self._names.get(names)
        if shared is None:
            if len(self._names) >= _MAX_SHARED_NAMES:
                self._names.clear()
            shared = self._names[names] = names
        return shared
