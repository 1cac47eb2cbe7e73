"""Feedback: label mapping, rolling accuracy, the join by feedback id and its effects."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence

import numpy as np
import pytest

from ensemble.config import PolicySpec, ProfileConfig
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.dataplane.feedback import (
    Duplicate,
    FeedbackHub,
    RollingAccuracy,
    UnknownId,
    class_indices,
    parse_body,
)
from ensemble.dataplane.feedback_store import ENTRY_OVERHEAD_BYTES
from ensemble.errors import EnsembleError, InvalidInput, ModelNotFound
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.repository import EnsembleModel, Profile, Repository
from ensemble.state import LocalCell
from ensemble.types import (
    Feedback,
    InferRequest,
    InferResponse,
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
    return FeedbackHub(metrics, lambda: repository, enabled=True, **kw), repository, metrics


def _body(feedback_id: str, label: object) -> bytes:
    return json.dumps({"feedback_id": feedback_id, "label": label}).encode()


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
        b'{"feedback_id": "", "label": 1}',
        b'{"feedback_id": 7, "label": 1}',
        b'{"feedback_id": "r1"}',
        b'{"feedback_id": "r1", "label": 1, "extra": true}',
    ],
)
def test_parse_body_rejects_malformed(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_body(body)


def test_a_request_id_is_no_way_to_join() -> None:
    with pytest.raises(InvalidInput, match="feedback_id"):
        parse_body(b'{"id": "req-42", "label": 1}')


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
    fid = hub.remember("pets", "default", ("a", "b"), _answers())
    result = hub.submit("pets", _body(fid, "cat"))
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
    fid = hub.remember("pets", "default", ("a", "b"), _answers(batch=4))
    result = hub.submit("pets", _body(fid, ["cat", "dog", "cat", "eel"]))
    assert result["members"] == {"a": 0.5, "b": 0.25}
    assert repository.members["a"].rolling_accuracy == 0.5


def test_exp3_profile_learns_from_its_own_requests() -> None:
    hub, repository, _ = _hub()
    bandit = repository.ensembles["pets"].profiles["bandit"]
    before = BanditState({"a": 1.0, "b": 1.0})  # as after draws of both
    bandit.learning = LocalCell(before)
    fid = hub.remember("pets", "bandit", ("b",), _answers(names=("b",)))
    hub.submit("pets", _body(fid, "cat"))  # b was wrong
    assert bandit.state != before
    assert bandit.state.weights["b"] < bandit.state.weights["a"] == 1.0
    assert repository.ensembles["pets"].profiles["default"].state.weights == {}


def test_duplicate_feedback_is_409_and_counted_once() -> None:
    hub, repository, metrics = _hub()
    fid = hub.remember("pets", "default", ("a", "b"), _answers())
    hub.submit("pets", _body(fid, "cat"))
    state = repository.ensembles["pets"].profiles["default"].state
    with pytest.raises(Duplicate) as info:
        hub.submit("pets", _body(fid, "cat"))
    assert info.value.http_status == 409 and fid in info.value.message
    assert hub.store.nbytes == ENTRY_OVERHEAD_BYTES  # the joined answer's classes are freed
    assert repository.ensembles["pets"].profiles["default"].state is state
    assert metrics.feedback[("pets", "accepted")] == 1
    assert metrics.feedback[("pets", "duplicate")] == 1


def test_unknown_and_evicted_ids_are_404_naming_the_id() -> None:
    hub, _, metrics = _hub(window=1)
    old = hub.remember("pets", "default", ("a",), _answers(names=("a",)))
    hub.remember("pets", "default", ("a",), _answers(names=("a",)))
    for feedback_id in (old, "never"):
        with pytest.raises(UnknownId) as info:
            hub.submit("pets", _body(feedback_id, "cat"))
        assert info.value.http_status == 404 and repr(feedback_id) in info.value.message
    assert metrics.feedback[("pets", "unknown_id")] == 2


def test_a_feedback_id_joins_only_its_own_ensemble() -> None:
    hub, _, metrics = _hub()
    fid = hub.remember("other", "default", ("a", "b"), _answers())
    with pytest.raises(UnknownId):
        hub.submit("pets", _body(fid, "cat"))
    assert metrics.feedback[("pets", "unknown_id")] == 1


def test_refused_posts_are_counted_without_unknown_names() -> None:
    hub, _, metrics = _hub()
    hub.refused("pets")
    hub.refused("no-such-model")
    assert metrics.feedback[("pets", "unauthorized")] == 1
    assert metrics.feedback[("", "unauthorized")] == 1


def test_invalid_feedback_is_400_and_leaves_the_prediction_joinable() -> None:
    hub, _, metrics = _hub()
    fid = hub.remember("pets", "default", ("a", "b"), _answers(batch=2))
    for body in (_body(fid, "cat"), _body(fid, ["cat", "cow"]), b"{"):
        with pytest.raises(InvalidInput):
            hub.submit("pets", body)
    assert metrics.feedback[("pets", "invalid")] == 3
    assert hub.submit("pets", _body(fid, ["cat", "dog"]))["accepted"] is True


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
    hub.remember("pets", "default", ("a", "b"), _answers())
    fid = hub.remember("pets", "default", ("a", "b"), _answers())
    hub.submit("pets", _body(fid, "dog"))
    text = metrics.exposition()[0].decode()
    assert "ensemble_feedback_store_answers 2.0" in text
    assert f"ensemble_feedback_store_bytes {2 * ENTRY_OVERHEAD_BYTES + 2}.0" in text
    assert 'ensemble_feedback_total{ensemble="pets",outcome="accepted"} 1.0' in text
    assert 'ensemble_member_rolling_accuracy{ensemble="pets",member="b"} 1.0' in text
    assert 'ensemble_selection_weight{ensemble="pets",member="a",profile="default"}' in text


# -- the dispatcher gives every ensemble answer its own feedback id ---------------------


def _request(request_id: str | None, policy: str | None = None) -> InferRequest:
    x = np.zeros((1, 2), dtype=np.float32)
    params: Parameters = {"policy": policy} if policy else {}
    return InferRequest("pets", None, [Tensor("x", "FP32", (1, 2), x)], request_id, None, params)


def test_every_ensemble_answer_gets_its_own_feedback_id() -> None:
    repository = _repository()
    dispatcher = Dispatcher(repository, GatewayMetrics(), feedback=True, feedback_window=10)

    async def run() -> list[InferResponse]:
        return [
            await dispatcher.infer(_request("mine"), "http"),
            await dispatcher.infer(_request(None), "http"),
            await dispatcher.infer(_request("b-1", "bandit"), "http"),
            await dispatcher.infer(InferRequest("a", None, _request(None).inputs), "http"),
        ]

    with_id, without_id, bandit, member = asyncio.run(run())
    assert with_id.id == "mine"  # the client's id is echoed, and is not what joins
    ids = [r.parameters["feedback_id"] for r in (with_id, without_id, bandit)]
    assert all(isinstance(i, str) and len(i) >= 22 for i in ids) and len(set(ids)) == 3
    assert "feedback_id" not in member.parameters  # members answer alone: nothing to learn
    store = dispatcher.feedback.store
    assert len(store) == 3 and "mine" not in store
    entry = store.get(str(ids[0]))
    assert entry is not None and entry.asked == ("a", "b") and entry.batch == 1
    entry = store.get(str(ids[2]))
    assert entry is not None and entry.profile == "bandit" and len(entry.asked) == 1
    result = dispatcher.feedback.submit("pets", _body(str(ids[0]), "cat"))
    assert result["members"] == {"a": True, "b": False}


def test_two_clients_reusing_one_request_id_each_join_their_own_answer() -> None:
    repository = _repository()
    dispatcher = Dispatcher(repository, GatewayMetrics(), feedback=True)

    async def run() -> tuple[InferResponse, InferResponse]:
        first = await dispatcher.infer(_request("same-id"), "http")
        second = await dispatcher.infer(_request("same-id", "bandit"), "http")
        return first, second

    first, second = asyncio.run(run())
    assert first.id == second.id == "same-id"
    hub = dispatcher.feedback
    first_result = hub.submit("pets", _body(str(first.parameters["feedback_id"]), "cat"))
    assert set(first_result["members"]) == {"a", "b"}  # the first client's exp4 answer
    second_result = hub.submit("pets", _body(str(second.parameters["feedback_id"]), "dog"))
    assert list(second_result["members"]) == [second.parameters["members_asked"]]
    with pytest.raises(InvalidInput):
        hub.submit("pets", json.dumps({"id": "same-id", "label": "cat"}).encode())


def test_without_feedback_nothing_is_minted_or_kept() -> None:
    dispatcher = Dispatcher(_repository(), GatewayMetrics())
    response = asyncio.run(dispatcher.infer(_request("mine"), "http"))
    assert "feedback_id" not in response.parameters
    assert len(dispatcher.feedback.store) == 0


def test_error_classes_are_ensemble_errors() -> None:
    assert issubclass(Duplicate, EnsembleError) and issubclass(UnknownId, EnsembleError)


# -- compact storage teaches the policies exactly what full probabilities did -----------


def test_kept_classes_teach_exp4_exp3_and_cocktail_as_full_probabilities_did() -> None:
    hub, repository, _ = _hub()
    ensemble = repository.ensembles["pets"]
    vote = ProfileConfig(
        selection=PolicySpec(name="cocktail", params={"window": 5, "cooldown_windows": 0})
    )
    ensemble.profiles["vote"] = Profile.build("vote", vote)
    reference = {name: _profile(name, kind) for name, kind in (("default", "exp4"),
                 ("bandit", "exp3"))}  # fmt: skip
    reference["vote"] = Profile.build("vote", vote)
    for profile in (*ensemble.profiles.values(), *reference.values()):
        profile.learning = LocalCell(profile.selection.initial_state())
    rng = np.random.default_rng(7)
    expected_exp4 = {"a": 1.0, "b": 1.0}
    for i in range(120):
        batch = int(rng.integers(1, 6))
        probabilities = {m: rng.random((batch, 3)).astype(np.float32) for m in ("a", "b")}
        labels = rng.integers(0, 3, batch)
        given = [MemberAnswer(m, "edge", "edge/0", p, 0.001) for m, p in probabilities.items()]
        name = ("default", "bandit", "vote")[i % 3]
        fid = hub.remember("pets", name, ("a", "b"), given)
        hub.submit("pets", _body(fid, [CLASSES[c] for c in labels]))
        # What the policies saw when the gateway kept the members' probabilities:
        ref = reference[name]
        event = Feedback.from_probabilities("pets", fid, labels, probabilities, ("a", "b"))
        ref.learning.update(lambda state: ref.selection.feedback(event, state))  # noqa: B023
        if name == "default":  # Clipper's Exp4 from the probabilities themselves (eta = 1)
            for m, p in probabilities.items():
                expected_exp4[m] *= math.exp(-float(np.mean(p.argmax(axis=1) != labels)))
            top = max(expected_exp4.values())
            expected_exp4 = {m: max(w / top, 1e-6) for m, w in expected_exp4.items()}
    for name, ref in reference.items():
        assert ensemble.profiles[name].state == ref.state, name
    assert ensemble.profiles["default"].state.weights == pytest.approx(expected_exp4)
    assert ensemble.profiles["vote"].state.correct  # cocktail counted right answers
