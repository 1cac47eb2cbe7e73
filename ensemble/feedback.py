"""Clipper-style feedback: true labels joined by request id to what the members answered."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.errors import EnsembleError, InvalidInput
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.onnx import ClassLabel
from ensemble.repository import EnsembleModel, Repository
from ensemble.types import Feedback, MemberAnswer

DEFAULT_WINDOW = 10_000
DEFAULT_ACCURACY_WINDOW = 200


@dataclass(slots=True)
class Prediction:
    """What one answered ensemble request left behind for a later label to be joined to."""

    profile: str
    asked: tuple[str, ...]
    answers: Sequence[MemberAnswer]
    """The dispatcher's own list of answers (a reference: nothing is copied on the hot path)."""
    at: float
    """``time.monotonic()`` when the answer was remembered."""
    joined: bool = False
    """Feedback was already accepted for it (a second one is a 409, counted once)."""

    @property
    def batch(self) -> int:
        return int(self.answers[0].probabilities.shape[0]) if self.answers else 0


class PredictionStore:
    """The last ``capacity`` predictions of one ensemble by request id, oldest evicted first.

    A plain dict keeps insertion order, so eviction pops its first key; a reused request id
    replaces the older prediction and moves to the newest end. Memory stays flat at about
    ``capacity`` entries of references to arrays the request computed anyway.
    """

    def __init__(self, capacity: int = DEFAULT_WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: dict[str, Prediction] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def remember(self, request_id: str, prediction: Prediction) -> None:
        entries = self._entries
        if entries.pop(request_id, None) is None and len(entries) >= self.capacity:
            del entries[next(iter(entries))]
        entries[request_id] = prediction

    def get(self, request_id: str) -> Prediction | None:
        return self._entries.get(request_id)


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
    """The request id and the labels (one per row) of a feedback body; InvalidInput if bad."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"feedback body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput('feedback body must be a JSON object {"id": ..., "label": ...}')
    unknown = sorted(set(doc) - {"id", "label"})
    if unknown:
        raise InvalidInput(f"unknown feedback field(s): {', '.join(unknown)}; expected id, label")
    request_id = doc.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise InvalidInput("feedback needs `id`: the non-empty id of the earlier request")
    if "label" not in doc:
        raise InvalidInput("feedback needs `label`: the true class label, or a list per row")
    label = doc["label"]
    return request_id, label if isinstance(label, list) else [label]


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
    """Every ensemble's recent predictions, the members' rolling accuracy, and the join.

    Lives on the dispatcher, not on the models, so remembered predictions and accuracy windows
    survive a config reload; the profile and members are looked up in the repository serving
    when the feedback arrives. Runs only on the event loop (no locks).
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        repository: Callable[[], Repository],
        *,
        window: int = DEFAULT_WINDOW,
        accuracy_window: int = DEFAULT_ACCURACY_WINDOW,
    ) -> None:
        self.metrics = metrics
        self._repository = repository
        self.window = window
        self.accuracy_window = accuracy_window
        self.stores: dict[str, PredictionStore] = {}
        self.accuracy: dict[tuple[str, str], RollingAccuracy] = {}
        metrics.selection_weights = self._weights

    def remember(
        self,
        ensemble: str,
        request_id: str,
        profile: str,
        asked: tuple[str, ...],
        answers: Sequence[MemberAnswer],
    ) -> None:
        """Keep an answered request for a later label (the hot path: one dict insert)."""
        store = self.stores.get(ensemble)
        if store is None:
            store = self.stores[ensemble] = PredictionStore(self.window)
        store.remember(request_id, Prediction(profile, asked, answers, time.monotonic()))

    def submit(self, name: str, body: bytes) -> dict[str, Any]:
        """Join a feedback body to ``name``'s prediction; raises EnsembleError subclasses."""
        outcome, ensemble = "invalid", ""  # unknown names never become label values
        try:
            model = self._repository().get(name)
            ensemble = model.name
            if not isinstance(model, EnsembleModel):
                raise InvalidInput(f"model {name!r} is not an ensemble; feedback goes to ensembles")
            request_id, labels = parse_body(body)
            result = self._join(model, request_id, labels)
            outcome = "accepted"
            return result
        except _Outcome as exc:
            outcome = exc.outcome
            raise
        finally:
            self.metrics.record_feedback(ensemble, outcome)

    def _join(self, model: EnsembleModel, request_id: str, labels: list[Any]) -> dict[str, Any]:
        store = self.stores.get(model.name)
        prediction = store.get(request_id) if store is not None else None
        if prediction is None:
            raise UnknownId(
                f"no recent prediction of {model.name!r} with id {request_id!r} (unknown, "
                f"answered without an id, or older than the last {self.window} predictions)"
            )
        if prediction.joined:
            raise Duplicate(f"feedback for id {request_id!r} was already accepted")
        if len(labels) != prediction.batch:
            raise InvalidInput(
                f"request {request_id!r} had {prediction.batch} row(s) but the feedback has "
                f"{len(labels)} label(s)"
            )
        truth = class_indices(labels, model.classes)
        prediction.joined = True
        answers = {a.member: a.probabilities for a in prediction.answers}
        event = Feedback(model.name, request_id, truth, answers, prediction.asked)
        profile = model.profiles.get(prediction.profile)
        if profile is not None:  # a reload may have removed the profile since
            profile.state = profile.selection.feedback(event, profile.state)
        members: dict[str, bool | float] = {}
        for member, probabilities in answers.items():
            correct = np.asarray(probabilities).argmax(axis=1) == truth
            key = (model.name, member)
            window = self.accuracy.get(key)
            if window is None:
                window = self.accuracy[key] = RollingAccuracy(self.accuracy_window)
            value = window.add(correct)
            self.metrics.rolling_accuracy[key] = value
            served = model.members.get(member)
            if served is not None:
                served.rolling_accuracy = value
            members[member] = bool(correct[0]) if len(correct) == 1 else float(correct.mean())
        return {"accepted": True, "members": members}

    def _weights(self) -> Iterator[tuple[str, str, str, float]]:
        """(ensemble, profile, member, weight) of every profile that learns weights (Exp4's)."""
        repository = self._repository()
        for ensemble in repository.ensembles.values():
            for profile in ensemble.profiles.values():
                weights: Mapping[str, float] | None = profile.weights()
                for member, weight in (weights or {}).items():
                    yield ensemble.name, profile.name, member, weight


class _Outcome(EnsembleError):
    """A feedback error counted under its own outcome rather than `invalid`."""

    outcome = "invalid"


class UnknownId(_Outcome):
    """No remembered prediction has this id (never seen, sent without id, or evicted)."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    outcome = "unknown_id"


class Duplicate(_Outcome):
    """Feedback for this request id was already accepted (counted once)."""

    http_status = 409
    grpc_code = "ALREADY_EXISTS"
    outcome = "duplicate"
