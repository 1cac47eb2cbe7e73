"""A member's versions and rollouts: the judgement on evidence (pure), routing among versions,
decisions applied once, config checks, and loading or unloading a model in a config."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensemble.config import MemberConfig, RolloutConfig, parse_config
from ensemble.control.lifecycle import requested_version, with_loaded
from ensemble.errors import ConfigError, InvalidInput, ModelNotFound
from ensemble.replicas.member import Member
from ensemble.replicas.versions import CHECK_EVERY, Decision, Evidence, Versions, judge
from ensemble.types import TensorSpec
from tests.unit.test_feedback import FixedReplica


def evidence(calls: int, errors: int = 0, latency: float = 0.01, labelled: int = 0,
             correct: int = 0) -> Evidence:  # fmt: skip
    e = Evidence()
    for i in range(calls):
        e.call(i >= errors, latency)
    e.labelled, e.correct = labelled, correct
    return e


RULES = RolloutConfig(version="2", min_calls=20, min_labels=50)


def test_judge_waits_for_every_measures_minimum_sample() -> None:
    verdict, readings = judge(RULES, evidence(100, labelled=100, correct=95), evidence(10))
    assert verdict == "wait"
    assert {r.measure for r in readings} == {"error_rate", "latency_p95_s", "accuracy"}


def test_judge_promotes_when_every_measure_passes() -> None:
    stable = evidence(100, latency=0.010, labelled=100, correct=90)
    candidate = evidence(40, latency=0.012, labelled=60, correct=57)
    verdict, readings = judge(RULES, stable, candidate)
    assert verdict == "promote", readings
    assert all(r.verdict == "promote" for r in readings)


@pytest.mark.parametrize(
    ("candidate", "failing"),
    [
        (evidence(40, errors=4, labelled=60, correct=57), "error_rate"),
        (evidence(40, latency=0.020, labelled=60, correct=57), "latency_p95_s"),
        (evidence(40, labelled=60, correct=40), "accuracy"),
    ],
)
def test_judge_rolls_back_on_one_measure_past_its_threshold(
    candidate: Evidence, failing: str
) -> None:
    stable = evidence(100, latency=0.010, labelled=100, correct=90)
    verdict, readings = judge(RULES, stable, candidate)
    assert verdict == "rollback"
    assert [r.measure for r in readings if r.verdict == "rollback"] == [failing]


def test_latency_within_the_slack_passes_whatever_the_ratio() -> None:
    stable, candidate = evidence(100, latency=0.001), evidence(40, latency=0.004)
    rules = RULES.model_copy(update={"max_accuracy_drop": None})
    assert judge(rules, stable, candidate)[0] == "promote"
    strict = rules.model_copy(update={"latency_slack_s": 0.0})
    assert judge(strict, stable, candidate)[0] == "rollback"


def test_judge_rolls_back_early_on_errors_before_labels_arrive() -> None:
    stable, candidate = evidence(100), evidence(30, errors=10)
    assert judge(RULES, stable, candidate)[0] == "rollback"


def test_a_measure_left_out_does_not_decide() -> None:
    rules = RULES.model_copy(update={"max_accuracy_drop": None, "max_latency_ratio": None})
    verdict, readings = judge(rules, evidence(30), evidence(30, latency=1.0))
    assert verdict == "promote" and [r.measure for r in readings] == ["error_rate"]


def test_shadow_judges_agreement_not_accuracy() -> None:
    rules = RULES.model_copy(update={"mode": "shadow", "min_agreement": 0.9})
    stable, candidate = evidence(30), evidence(30)
    assert judge(rules, stable, evidence(10), (19, 19))[0] == "wait"
    assert judge(rules, stable, candidate, (0, 0))[0] == "wait"
    assert judge(rules, stable, candidate, (25, 30))[0] == "rollback"
    verdict, readings = judge(rules, stable, candidate, (29, 30))
    assert verdict == "promote"
    assert "accuracy" not in {r.measure for r in readings}


def member(version: str) -> Member:
    spec = (TensorSpec("input", "FP32", (-1, 64)),)
    return Member("clf", spec, spec, None, [FixedReplica([1.0])], version=version,
                  label="clf" if version == "1" else f"clf:{version}")  # fmt: skip


def test_versions_route_a_canary_share_and_a_shadow_copy() -> None:
    rules = RolloutConfig(version="2", weight=0.25)
    several = Versions("clf", [member("1"), member("2")], "1", rules)
    rng = random.Random(1)
    picks = [several.route(rng)[0].version for _ in range(4000)]
    assert 0.22 < picks.count("2") / 4000 < 0.28
    assert several.share("2") == 0.25 and several.share("1") == 0.75
    shadow = Versions("clf", [member("1"), member("2")], "1", rules.model_copy(
        update={"mode": "shadow"}))  # fmt: skip
    first, copy = shadow.route(rng)
    assert first.version == "1" and copy is not None and copy.version == "2"


def test_evidence_leads_to_one_decision_applied_once() -> None:
    rules = RolloutConfig(version="2", min_calls=10, max_accuracy_drop=None)
    several = Versions("clf", [member("1"), member("2")], "1", rules)
    published: list[Decision] = []
    several.publish = published.append
    for _ in range(CHECK_EVERY * 2):
        several.observe("1", True, 0.01)
        several.observe("2", False, 0.0)
    assert published and published[0].verdict == "rollback"
    assert "error_rate" in published[0].reason
    assert several.apply(published[0]) is True
    assert several.apply(published[0]) is False  # a second copy is no news
    assert several.rollout is not None and several.rollout.phase == "rolled_back"
    assert several.route(random.Random(0)) == (several.serving, None)
    assert several.serving.version == "1" and several.share("2") == 0.0
    assert several.state("2").startswith("rolled back: ")


def test_each_step_of_the_evidence_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    rules = RolloutConfig(version="2", min_calls=CHECK_EVERY * 2, max_accuracy_drop=None)
    several = Versions("clf", [member("1"), member("2")], "1", rules)
    several.publish = lambda decision: None
    caplog.set_level("INFO", logger="ensemble.rollout")
    caplog.clear()
    for _ in range(CHECK_EVERY * 4):  # too few calls for two checks, then enough
        several.observe("1", True, 0.01)
        several.observe("2", True, 0.01)
    steps = [r.getMessage() for r in caplog.records if "against 1" in r.getMessage()]
    assert len(steps) == 2, steps  # each change of a measure's verdict, not each check
    assert "error_rate 0 vs 0: too few samples" in steps[0]
    assert "error_rate 0 vs 0: within" in steps[1]


def test_a_promoted_candidate_serves_and_labels_count_for_their_version() -> None:
    rules = RolloutConfig(version="2", min_calls=10, min_labels=10, max_latency_ratio=None)
    several = Versions("clf", [member("1"), member("2")], "1", rules)
    for _ in range(CHECK_EVERY):
        several.observe("1", True, 0.01)
        several.observe("2", True, 0.01)
        several.labelled("1", np.array([True, False]))
        several.labelled("2", np.array([True, True]))
    assert several.rollout is not None and several.rollout.phase == "promoted"
    assert several.serving.version == "2" and several.share("2") == 1.0


def test_manual_rollouts_only_measure() -> None:
    rules = RolloutConfig(version="2", min_calls=10, auto=False)
    several = Versions("clf", [member("1"), member("2")], "1", rules)
    for _ in range(CHECK_EVERY * 4):
        several.observe("2", False, 0.0)
        several.observe("1", True, 0.0)
    assert several.rollout is not None and several.rollout.phase == "running"
    assert several.rollout.verdict()[0] == "rollback"


# -- config ---------------------------------------------------------------------------------


def member_doc(**extra: Any) -> dict[str, Any]:
    return {
        "name": "clf",
        "model": "a.onnx",
        "placement": [{"tier": "edge"}],
        "versions": [{"version": "2", "model": "b.onnx"}, {"version": "3", "model": "c.onnx"}],
        **extra,
    }


def test_served_versions_and_a_versions_own_config() -> None:
    m = MemberConfig.model_validate(member_doc(loaded_versions=["1", "3"]))
    assert m.served_versions() == ["1", "3"]
    three = m.at_version("3")
    assert (three.version, str(three.model), three.versions) == ("3", "c.onnx", [])
    assert m.label("1") == "clf" and m.label("3") == "clf:3"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"versions": [{"version": "1", "model": "b.onnx"}]}, "given more than once"),
        ({"default_version": "7"}, "no version '7'"),
        ({"rollout": {"version": "9"}}, "no version '9'"),
        ({"rollout": {"version": "2"}, "default_version": "2"}, "is the default_version"),
        ({"rollout": {"version": "2"}, "loaded_versions": ["1"]}, "needs the candidate"),
        ({"loaded_versions": []}, "loaded_versions: empty"),
        ({"default_version": "2", "loaded_versions": ["1"]}, "version 2 is not loaded"),
        ({"versions": [{"version": "v2", "model": "b.onnx"}]}, "should match pattern"),
    ],
)
def test_bad_versions_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemberConfig.model_validate(member_doc(**extra))


def gateway_doc(tmp_path: Path) -> dict[str, Any]:
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.onnx").write_bytes(b"x")
    return {
        "model_zoo": {"build_if_missing": False},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    member_doc(rollout={"version": "3"}, default_version="2"),
                    {"name": "other", "model": "d.onnx", "placement": [{"tier": "edge"}]},
                ],
            }
        ],
    }


def test_loading_and_unloading_change_only_that_model(tmp_path: Path) -> None:
    cfg = parse_config(gateway_doc(tmp_path), base_dir=tmp_path)
    less = with_loaded(cfg, "clf", "3", loaded=False)
    clf = less.ensembles[0].members[0]
    assert clf.served_versions() == ["1", "2"]
    assert clf.rollout is None  # its candidate is gone
    assert clf.default_version == "2"
    fewer = with_loaded(less, "clf", "2", loaded=False).ensembles[0].members[0]
    assert (fewer.served_versions(), fewer.default_version) == (["1"], None)
    back = with_loaded(less, "clf", None, loaded=True).ensembles[0].members[0]
    assert back.served_versions() == ["1", "2", "3"] and back.loaded_versions is None
    gone = with_loaded(cfg, "other", None, loaded=False)
    assert not gone.ensembles[0].members[1].loaded
    assert with_loaded(cfg, "digits", None, loaded=False).ensembles[0].loaded is False
    assert cfg.ensembles[0].members[0].served_versions() == ["1", "2", "3"]  # unchanged


def test_lifecycle_errors(tmp_path: Path) -> None:
    cfg = parse_config(gateway_doc(tmp_path), base_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        with_loaded(cfg, "nope", None, loaded=False)
    with pytest.raises(ModelNotFound, match="no version '8'"):
        with_loaded(cfg, "clf", "8", loaded=True)
    one = with_loaded(with_loaded(cfg, "clf", "3", loaded=False), "clf", "2", loaded=False)
    with pytest.raises(InvalidInput, match="last one"):
        with_loaded(one, "clf", "1", loaded=False)
    assert requested_version({"version": 2, "unload_dependents": True}) == "2"
    assert requested_version({}) is None
    for bad in ({"config": "{}"}, {"file:1/model.onnx": "x"}, {"colour": 1}, {"version": []}, []):
        with pytest.raises(InvalidInput):
            requested_version(bad)


def test_an_ensemble_with_no_member_loaded_is_refused(tmp_path: Path) -> None:
    doc = gateway_doc(tmp_path)
    for m in doc["ensembles"][0]["members"]:
        m["loaded"] = False
    with pytest.raises(ConfigError, match="no member is loaded"):
        parse_config(doc, base_dir=tmp_path)
