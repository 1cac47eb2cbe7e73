"""Clipper-style feedback: true labels joined to the answers by the feedback id each carried."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.dataplane.feedback_store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_WINDOW,
    Answered,
    AnswerStore,
)
from ensemble.errors import EnsembleError, InvalidInput
from ensemble.metrics import GatewayMetrics
from ensemble.repository import EnsembleModel, Repository
from ensemble.types import ClassLabel, Feedback, MemberAnswer

DEFAULT_ACCURACY_WINDOW = 200
FEEDBACK_FIELDS = ("feedback_id", "label")


class RollingAccuracy:
    """Share of correct rows among a member's last ``window`` labelled rows.

    A sliding window rather than an exponential average: its value is an exact, explainable
    accuracy ("k of the last n rows"), and it forgets old behaviour completely after n rows.
    """

    __slots__ = ("_correct", "_rows")

    def __init__(self, window: int = DEFAULT_ACCURACY_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._rows: deque[bool] = deque(maxlen=window)
        self._correct = 0

    def add(self, correct: Sequence[bool] | np.ndarray) -> float:
        """Record rows (True when the member was right); returns the accuracy now."""
        rows = self._rows
        for ok in np.asarray(correct, dtype=bool).tolist():
            if len(rows) == rows.maxlen:
                self._correct -= rows[0]
            rows.append(ok)
            self._correct += ok
        value = self.value
        assert value is not None  # at least one row was added or was there before
        return value

    @property
    def value(self) -> float | None:
        """None before any row."""
        return self._correct / len(self._rows) if self._rows else None

    def __len__(self) -> int:
        return len(self._rows)


def parse_body(body: bytes) -> tuple[str, list[Any]]:
    """The feedback id and the labels (one per row) of a feedback body; InvalidInput if bad."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"feedback body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput('feedback body must be a JSON object {"feedback_id": ..., "label": ...}')
    unknown = sorted(set(doc) - set(FEEDBACK_FIELDS))
    if unknown:
        hint = " (answers are joined by the `feedback_id` they carry)" if "id" in unknown else ""
        raise InvalidInput(
            f"unknown feedback field(s): {', '.join(unknown)}; expected "
            f"{', '.join(FEEDBACK_FIELDS)}{hint}"
        )
    feedback_id = doc.get("feedback_id")
    if not isinstance(feedback_id, str) or not feedback_id:
        raise InvalidInput(
            "feedback needs `feedback_id`: the one in the earlier answer's parameters"
        )
    if "label" not in doc:
        raise InvalidInput("feedback needs `label`: the true class label, or a list per row")
    label = doc["label"]
    return feedback_id, label if isinstance(label, list) else [label]


def class_indices(labels: Sequence[Any], classes: Sequence[ClassLabel]) -> np.ndarray:
    """True class labels (as the ensemble names them) -> class indices; InvalidInput if unknown."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(labels), dtype=np.int64)
    for row, label in enumerate(labels):
        # bool is an int (True == 1) and 3.0 hashes like 3: neither is a class label.
        found = None if type(label) not in (int, str) else index.get(label)
        if found is None:
            shown = ", ".join(map(str, classes[:20])) + (", ..." if len(classes) > 20 else "")
            raise InvalidInput(f"label {label!r} (row {row}) is not a class; classes: {shown}")
        out[row] = found
    return out


class FeedbackHub:
    """The answers kept for feedback, the members' rolling accuracy, and the join.

    Lives on the dispatcher, not on the models, so kept answers and accuracy windows survive a
    config reload; the profile and members are looked up in the repository serving when the
    feedback arrives. Only an ``enabled`` hub (the gateway has a feedback token) is given
    answers to keep. One store serves every ensemble, so its bounds bound the gateway's memory.
    Runs only on the event loop (no locks).
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        repository: Callable[[], Repository],
        *,
        enabled: bool = False,
        window: int = DEFAULT_WINDOW,
        max_bytes: int = DEFAULT_MAX_BYTES,
        accuracy_window: int = DEFAULT_ACCURACY_WINDOW,
    ) -> None:
        self.metrics = metrics
        self._repository = repository
        self.enabled = enabled
        """Answers get a feedback id and are kept (the gateway has a feedback token)."""
        self.store = AnswerStore(window, max_bytes)
        self.accuracy_window = accuracy_window
        self.accuracy: dict[tuple[str, str], RollingAccuracy] = {}
        self.learn: Callable[[LabelledAnswer], None] = self.apply
        """Where a joined label goes: applied here (one process), or published to every
        worker of the gateway, each of which applies it in the same order."""
        metrics.selection_weights = self._weights
        metrics.feedback_store = self._store_size

    def remember(
        self, ensemble: str, profile: str, asked: tuple[str, ...], answers: Sequence[MemberAnswer]
    ) -> str:
        """Keep an ensemble answer's predicted classes for a later label; its feedback id."""
        return self.store.remember(Answered.of(ensemble, profile, asked, answers))

    def refused(self, name: str) -> None:
        """Count a feedback post refused for its credentials (401/403)."""
        ensemble = name if name in self._repository().ensembles else ""
        self.metrics.record_feedback(ensemble, "unauthorized")

    def submit(self, name: str, body: bytes) -> dict[str, Any]:
        """Join a feedback body to ``name``'s answer; raises EnsembleError subclasses."""
        outcome, ensemble = "invalid", ""  # unknown names never become label values
        try:
            model = self._repository().get(name)
            ensemble = model.name
            if not isinstance(model, EnsembleModel):
                raise InvalidInput(f"model {name!r} is not an ensemble; feedback goes to ensembles")
            feedback_id, labels = parse_body(body)
            result = self._join(model, feedback_id, labels)
            outcome = "accepted"
            return result
        except _Outcome as exc:
            outcome = exc.outcome
            raise
        finally:
            self.metrics.record_feedback(ensemble, outcome)

    def _join(self, model: EnsembleModel, feedback_id: str, labels: list[Any]) -> dict[str, Any]:
        entry = self.store.get(feedback_id)
        if entry is None or entry.ensemble != model.name:
            raise UnknownId(
                f"no recent answer of {model.name!r} with feedback_id {feedback_id!r} (unknown, "
                f"from another ensemble, or evicted: the gateway keeps the last "
                f"{self.store.capacity} answers within {self.store.max_bytes} bytes)"
            )
        if entry.joined:
            raise Duplicate(f"feedback for feedback_id {feedback_id!r} was already accepted")
        if len(labels) != entry.batch:
            raise InvalidInput(
                f"the answer had {entry.batch} row(s) but the feedback has {len(labels)} label(s)"
            )
        truth = class_indices(labels, model.classes)
        predicted = dict(zip(entry.members, self.store.settle(feedback_id), strict=True))
        event = Feedback(
            model.name,
            feedback_id,
            truth,
            predicted,
            entry.asked,
            entry.n_classes,
            dict(entry.versions),
        )
        self.learn(LabelledAnswer(event, entry.profile))
        members: dict[str, bool | float] = {}
        for member, classes in predicted.items():
            correct = classes == truth
            members[member] = bool(correct[0]) if len(correct) == 1 else float(correct.mean())
        return {"accepted": True, "members": members}

    def apply(self, labelled: LabelledAnswer) -> None:
        """Learn from a labelled answer: its profile's selection state and the members'
        rolling accuracy (in the serving repository; a reload may have removed either)."""
        event = labelled.event
        model = self._repository().ensembles.get(event.ensemble)
        if model is None:
            return
        profile = model.profiles.get(labelled.profile)
        if profile is not None:
            profile.learning.update(lambda state: profile.selection.feedback(event, state))
        for member, classes in event.predicted.items():
            key = (model.name, member)
            window = self.accuracy.get(key)
            if window is None:
                window = self.accuracy[key] = RollingAccuracy(self.accuracy_window)
            correct = classes == event.labels
            value = window.add(correct)
            self.metrics.rolling_accuracy[key] = value
            served = model.members.get(member)
            if served is not None:
                served.rolling_accuracy = value
                version = event.versions.get(member)
                if served.versions is not None and version is not None:
                    served.versions.labelled(version, correct)

    def _store_size(self) -> tuple[int, int]:
        return len(self.store), self.store.nbytes

    def _weights(self) -> Iterator[tuple[str, str, str, float]]:
        """(ensemble, profile, member, weight) of every profile that learns weights (Exp4's)."""
        repository = self._repository()
        for ensemble in repository.ensembles.values():
            for profile in ensemble.profiles.values():
                weights: Mapping[str, float] | None = profile.weights()
                for member, weight in (weights or {}).items():
                    yield ensemble.name, profile.name, member, weight


@dataclass(frozen=True)
class LabelledAnswer:
    """A label joined to its answer: what every worker learns from."""

    event: Feedback
    profile: str


def owner(feedback_id: str) -> int | None:
    """The worker that keeps a feedback id's answer (its ``"<index>."`` prefix), or None for
    an id without one."""
    head, dot, _ = feedback_id.partition(".")
    return int(head) if dot and head.isdigit() and len(head) <= 4 else None


class _Outcome(EnsembleError):
    """A feedback error counted under its own outcome rather than `invalid`."""

    outcome = "invalid"


class UnknownId(_Outcome):
    """No kept answer of this ensemble has this feedback id (never issued, or evicted)."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "feedback_unknown_id"
    outcome = "unknown_id"


class Duplicate(_Outcome):
    """Feedback for this answer was already accepted (counted once)."""

    http_status = 409
    grpc_code = "ALREADY_EXISTS"
    reason = "feedback_duplicate"
    outcome = "duplicate"
