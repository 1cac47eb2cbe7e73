"""Feedback: the prediction store, label mapping, rolling accuracy and the join's effects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import pytest

from ensemble.config import PolicySpec, ProfileConfig
from ensemble.dispatcher import Dispatcher
from ensemble.errors import EnsembleError, InvalidInput, ModelNotFound
from ensemble.feedback import (
    Duplicate,
    FeedbackHub,
    Prediction,
    PredictionStore,
    RollingAccuracy,
    UnknownId,
    class_indices,
    parse_body,
)
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.repository import EnsembleModel, Profile, Repository
from ensemble.types import (
    InferRequest,
    MemberAnswer,
    ModelMetadata,
    Parameters,
    Tensor,
    TensorSpec,
)
from policies.selection_bandits import BanditState

CLASSES = ("cat", "dog", "eel")
# Each member's fixed answer for any row: a always says cat, b always dog.
ANSWERS = {"a": [0.8, 0.1, 0.1], "b": [0.1, 0.8, 0.1]}


class FixedReplica:
    """A replica that answers every row with the same class probabilities."""

    tier = "edge"
    name = "edge/0"

    def __init__(self, row: Sequence[float]) -> None:
        self.row = np.asarray(row, dtype=np.float32)

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        del outputs
        rows = next(iter(feed.values())).shape[0]
        return {"probs": np.tile(self.row, (rows, 1))}

    async def close(self) -> None:
        return None


def _member(name: str) -> Member:
    spec_in = (TensorSpec("x", "FP32", (-1, 2)),)
    spec_out = (TensorSpec("probs", "FP32", (-1, 3)),)
    schema = ClassifierSchema("probs", CLASSES, logits=False)
    return Member(name, spec_in, spec_out, schema, [FixedReplica(ANSWERS[name])])


def _profile(name: str, selection: str) -> Profile:
    spec = PolicySpec(name=selection, params={"eta": 1.0} if selection.startswith("exp") else {})
    return Profile.build(name, ProfileConfig(selection=spec))


def _repository() -> Repository:
    members = {n: _member(n) for n in ANSWERS}
    metadata = ModelMetadata(
        "pets",
        ("1",),
        "ensemble",
        (TensorSpec("x", "FP32", (-1, 2)),),
        (TensorSpec("label", "BYTES", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
    )
    profiles = {"default": _profile("default", "exp4"), "bandit": _profile("bandit", "exp3")}
    ensemble = EnsembleModel("pets", members, profiles, "default", CLASSES, metadata)
    return Repository([ensemble], list(members.values()))


def _answers(batch: int = 1, names: Sequence[str] = ("a", "b")) -> list[MemberAnswer]:
    return [
        MemberAnswer(
            n,
            "edge",
            "edge/0",
            np.tile(np.asarray(ANSWERS[n], dtype=np.float32), (batch, 1)),
            0.001,
        )
        for n in names
    ]


def _hub(**kw: int) -> tuple[FeedbackHub, Repository, GatewayMetrics]:
    repository = _repository()
    metrics = GatewayMetrics()
    return FeedbackHub(metrics, lambda: repository, **kw), repository, metrics


def _body(request_id: str, label: object) -> bytes:
    return json.dumps({"id": request_id, "label": label}).encode()


# -- the store --------------------------------------------------------------------------


def test_store_evicts_oldest_first_and_stays_bounded() -> None:
    store = PredictionStore(capacity=3)
    for i in range(5):
        store.remember(f"r{i}", Prediction("default", ("a",), _answers(), float(i)))
    assert len(store) == 3
    assert "r0" not in store and "r1" not in store
    assert all(f"r{i}" in store for i in (2, 3, 4))


def test_store_reused_id_replaces_and_becomes_newest() -> None:
    store = PredictionStore(capacity=2)
    store.remember("x", Prediction("default", ("a",), _answers(), 0.0))
    store.remember("y", Prediction("default", ("a",), _answers(), 1.0))
    store.remember("x", Prediction("bandit", ("b",), _answers(), 2.0))
    store.remember("z", Prediction("default", ("a",), _answers(), 3.0))
    assert "y" not in store  # x was refreshed, so y was the oldest
    entry = store.get("x")
    assert entry is not None and entry.profile == "bandit"


def test_store_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        PredictionStore(0)


# -- rolling accuracy -------------------------------------------------------------------


def test_rolling_accuracy_is_a_sliding_window_of_rows() -> None:
    acc = RollingAccuracy(window=3)
    assert acc.value is None
    assert acc.add([True]) == 1.0
    assert acc.add([False, True]) == pytest.approx(2 / 3)
    # window now [T, F, T]; one more F pushes out the first T -> [F, T, F]
    assert acc.add(np.array([False])) == pytest.approx(1 / 3)
    assert acc.add([True, True, True]) == 1.0
    assert len(acc) == 3


# -- parsing and label mapping ----------------------------------------------------------


def test_parse_body_scalar_and_list() -> None:
    assert parse_body(_body("r1", "cat")) == ("r1", ["cat"])
    assert parse_body(_body("r1", [1, 2])) == ("r1", [1, 2])


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"label": 1}',
        b'{"id": "", "label": 1}',
        b'{"id": 7, "label": 1}',
        b'{"id": "r1"}',
        b'{"id": "r1", "label": 1, "extra": true}',
    ],
)
def test_parse_body_rejects_malformed(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_body(body)


def test_class_indices_maps_labels_to_positions() -> None:
    assert class_indices(["eel", "cat"], CLASSES).tolist() == [2, 0]
    assert class_indices([9, 0], (0, 9)).tolist() == [1, 0]


@pytest.mark.parametrize("label", ["cow", 1, True, 1.0, None, ["cat"]])
def test_class_indices_rejects_what_is_not_a_class(label: object) -> None:
    with pytest.raises(InvalidInput, match="not a class"):
        class_indices([label], CLASSES)


def test_bool_is_not_an_int_class() -> None:
    with pytest.raises(InvalidInput):
        class_indices([True], (0, 1))


# -- the join and its effects -----------------------------------------------------------


def test_join_updates_exp4_weights_accuracy_views_and_metrics() -> None:
    hub, repository, metrics = _hub()
    ensemble = repository.ensembles["pets"]
    profile = ensemble.profiles["default"]
    ensemble.members["a"].view()  # cache a view before feedback: it must refresh
    hub.remember("pets", "r1", "default", ("a", "b"), _answers())
    result = hub.submit("pets", _body("r1", "cat"))
    assert result == {"accepted": True, "members": {"a": True, "b": False}}
    weights = profile.weights()
    assert weights is not None and weights["a"] > weights["b"]
    assert ensemble.members["a"].view().rolling_accuracy == 1.0
    assert ensemble.members["b"].view().rolling_accuracy == 0.0
    assert metrics.rolling_accuracy == {("pets", "a"): 1.0, ("pets", "b"): 0.0}
    assert metrics.feedback[("pets", "accepted")] == 1
    assert ("pets", "default", "a", weights["a"]) in set(metrics.selection_weights())


def test_join_batch_reports_share_per_member() -> None:
    hub, repository, _ = _hub()
    hub.remember("pets", "r1", "default", ("a", "b"), _answers(batch=4))
    result = hub.submit("pets", _body("r1", ["cat", "dog", "cat", "eel"]))
    assert result["members"] == {"a": 0.5, "b": 0.25}
    assert repository.members["a"].rolling_accuracy == 0.5


def test_exp3_profile_learns_from_its_own_requests() -> None:
    hub, repository, _ = _hub()
    bandit = repository.ensembles["pets"].profiles["bandit"]
    bandit.state = before = BanditState({"a": 1.0, "b": 1.0})  # as after draws of both
    hub.remember("pets", "r1", "bandit", ("b",), _answers(names=("b",)))
    hub.submit("pets", _body("r1", "cat"))  # b was wrong
    assert bandit.state != before
    assert bandit.state.weights["b"] < bandit.state.weights["a"] == 1.0
    assert repository.ensembles["pets"].profiles["default"].state.weights == {}


def test_duplicate_feedback_is_409_and_counted_once() -> None:
    hub, repository, metrics = _hub()
    hub.remember("pets", "r1", "default", ("a", "b"), _answers())
    hub.submit("pets", _body("r1", "cat"))
    state = repository.ensembles["pets"].profiles["default"].state
    with pytest.raises(Duplicate) as info:
        hub.submit("pets", _body("r1", "cat"))
    assert info.value.http_status == 409 and "r1" in info.value.message
    assert repository.ensembles["pets"].profiles["default"].state is state
    assert metrics.feedback[("pets", "accepted")] == 1
    assert metrics.feedback[("pets", "duplicate")] == 1


def test_unknown_and_evicted_ids_are_404_naming_the_id() -> None:
    hub, _, metrics = _hub(window=1)
    hub.remember("pets", "old", "default", ("a",), _answers(names=("a",)))
    hub.remember("pets", "new", "default", ("a",), _answers(names=("a",)))
    for request_id in ("old", "never"):
        with pytest.raises(UnknownId) as info:
            hub.submit("pets", _body(request_id, "cat"))
        assert info.value.http_status == 404 and repr(request_id) in info.value.message
    assert metrics.feedback[("pets", "unknown_id")] == 2


def test_invalid_feedback_is_400_and_leaves_the_prediction_joinable() -> None:
    hub, _, metrics = _hub()
    hub.remember("pets", "r1", "default", ("a", "b"), _answers(batch=2))
    for body in (_body("r1", "cat"), _body("r1", ["cat", "cow"]), b"{"):
        with pytest.raises(InvalidInput):
            hub.submit("pets", body)
    assert metrics.feedback[("pets", "invalid")] == 3
    assert hub.submit("pets", _body("r1", ["cat", "dog"]))["accepted"] is True


def test_unknown_model_and_member_model() -> None:
    hub, _, metrics = _hub()
    with pytest.raises(ModelNotFound):
        hub.submit("nope", _body("r1", "cat"))
    with pytest.raises(InvalidInput, match="not an ensemble"):
        hub.submit("a", _body("r1", "cat"))
    assert metrics.feedback[("", "invalid")] == 1  # unknown names never become labels
    assert metrics.feedback[("a", "invalid")] == 1


def test_exposition_has_the_feedback_families() -> None:
    hub, _, metrics = _hub()
    hub.remember("pets", "r1", "default", ("a", "b"), _answers())
    hub.submit("pets", _body("r1", "dog"))
    text = metrics.exposition()[0].decode()
    assert 'ensemble_feedback_total{ensemble="pets",outcome="accepted"} 1.0' in text
    assert 'ensemble_member_rolling_accuracy{ensemble="pets",member="b"} 1.0' in text
    assert 'ensemble_selection_weight{ensemble="pets",member="a",profile="default"}' in text


# -- the dispatcher remembers answered requests with an id ------------------------------


def _request(request_id: str | None, policy: str | None = None) -> InferRequest:
    x = np.zeros((1, 2), dtype=np.float32)
    params: Parameters = {"policy": policy} if policy else {}
    return InferRequest("pets", None, [Tensor("x", "FP32", (1, 2), x)], request_id, None, params)


def test_dispatcher_remembers_only_requests_with_an_id() -> None:
    repository = _repository()
    dispatcher = Dispatcher(repository, GatewayMetrics(), feedback_window=10)

    async def run() -> None:
        await dispatcher.infer(_request("with-id"), "http")
        await dispatcher.infer(_request(None), "http")
        await dispatcher.infer(_request("bandit-1", "bandit"), "http")

    asyncio.run(run())
    store = dispatcher.feedback.stores["pets"]
    assert len(store) == 2
    entry = store.get("with-id")
    assert entry is not None and entry.asked == ("a", "b") and entry.batch == 1
    bandit = store.get("bandit-1")
    assert bandit is not None and bandit.profile == "bandit" and len(bandit.asked) == 1
    result = dispatcher.feedback.submit("pets", _body("with-id", "cat"))
    assert result["members"] == {"a": True, "b": False}


def test_error_classes_are_ensemble_errors() -> None:
    assert issubclass(Duplicate, EnsembleError) and issubclass(UnknownId, EnsembleError)
