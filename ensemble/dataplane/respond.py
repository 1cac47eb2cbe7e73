"""The answer: output tensors and the response parameters that say how it was made."""

from __future__ import annotations

import functools

import numpy as np

from ensemble.dataplane.ensemble_run import EnsembleRun
from ensemble.replicas.member import Member
from ensemble.types import Aggregate, InferRequest, Param, Parameters, Tensor


def ensemble_outputs(run: EnsembleRun, agg: Aggregate) -> list[Tensor]:
    """``label`` (the class of each row) and ``probabilities`` of the combined answer."""
    model = run.model
    labels = model.labels[agg.class_index]
    probs = np.ascontiguousarray(agg.probabilities, dtype=np.float32)
    return [
        Tensor("label", model.metadata.outputs[0].datatype, (run.batch,), labels),
        Tensor("probabilities", "FP32", tuple(probs.shape), probs),
    ]


def ensemble_parameters(
    run: EnsembleRun, agg: Aggregate, kinds: tuple[str, ...], *, rerouted: bool
) -> Parameters:
    """Who was asked and answered, confidence, cost, accuracy, deadline and every way the
    answer is degraded (``kinds``: the contract's violations)."""
    answered = tuple((a.member, a.tier) for a in run.answers)
    params = dict(_describe(run.profile.name, tuple(run.asked), answered))
    # A batch's rows as floats: for the few rows a request has, cheaper than ndarray.min.
    params["confidence"] = round(min(agg.confidence.tolist()), 6)
    params["cost"] = round(run.cost, 9)
    accuracy = run.estimated_accuracy()
    if accuracy is not None:
        params["estimated_accuracy"] = round(accuracy, 6)
    if run.deadline is not None:
        params["deadline_met"] = not run.late
    versions = [f"{a.member}:{a.version}" for a in run.answers if a.version is not None]
    if versions:
        params["versions"] = ",".join(versions)
    if run.stages > 1:
        params["stages"] = run.stages
    if run.hedges:
        params["hedges"] = run.hedges
    if run.retries:
        params["retries"] = run.retries
    if degraded(run, kinds):
        params["degraded"] = True
        if kinds:
            params["violations"] = ",".join(kinds)
        if run.unreachable:
            params["unreachable"] = ",".join(run.unreachable)
    if run.fallback_used:
        params["fallback"] = str(run.profile.fallback)
    if rerouted:
        params["rerouted"] = True
    return params


def degraded(run: EnsembleRun, kinds: tuple[str, ...]) -> bool:
    """Whether the answer falls short: a contract violation, or the fallback member answered."""
    return bool(kinds) or run.fallback_used


def member_outputs(member: Member, result: dict[str, np.ndarray]) -> list[Tensor]:
    """A member's own outputs, as its model declares them."""
    return [
        Tensor(spec.name, spec.datatype, tuple(result[spec.name].shape), result[spec.name])
        for spec in member.outputs
    ]


def requested(request: InferRequest, outputs: list[Tensor]) -> list[Tensor]:
    """The outputs the request asked for, in its order (all when it names none)."""
    if request.outputs is None:
        return outputs
    by_name = {t.name: t for t in outputs}
    return [by_name[o.name] for o in request.outputs]


@functools.lru_cache(maxsize=1024)
def _describe(
    profile: str, chosen: tuple[str, ...], answered: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, Param], ...]:
    """The response parameters that depend only on who was asked and who answered (cached:
    the same few combinations repeat on every request)."""
    return (
        ("policy", profile),
        ("members_asked", ",".join(chosen)),
        ("members_answered", ",".join(f"{m}@{t}" for m, t in answered)),
        ("completeness", round(len(answered) / len(chosen), 6)),
    )
