"""Build a split member (`members[].split`): its model cut at the offered tensors, a path per
way to run it (all on the head tier, all on the tail tier, each cut), each session timed on a
few calls so the split policy has each part's compute from the start (it keeps learning)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from ensemble.config import MemberConfig
from ensemble.control.backends import Site
from ensemble.errors import EnsembleError
from ensemble.models.card import MemberCard
from ensemble.models.split import CutPoint, cut_points, split
from ensemble.oip.datatypes import OIP_TO_NUMPY
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import SessionRunner
from ensemble.replicas.faults import SlowReplica
from ensemble.replicas.inprocess import InProcessReplica
from ensemble.replicas.links import LinkedReplica
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.replicas.onnx import load_session, read_signature
from ensemble.replicas.split import CLOUD, EDGE, Part, SplitPath, Splitter
from policies import registry
from policies.base import SplitPolicy

PROFILE_RUNS = ((1, 24), (8, 12))
"""(rows, runs) each session is timed on before it serves."""


def offered_cuts(model: onnx.ModelProto, at: list[str] | None, input_bytes: int) -> list[CutPoint]:
    """The cuts a split member offers: those ``at`` names (each must be a cut point), else
    every cut point that sends fewer bytes a row than the input and every earlier cut."""
    cuts = cut_points(model)
    if at is not None:
        by_name = {c.tensor: c for c in cuts}
        unknown = [name for name in at if name not in by_name]
        if unknown:
            raise EnsembleError(
                f"split.at: {', '.join(unknown)} not a cut point of the model; cut points: "
                f"{', '.join(by_name) or 'none'}"
            )
        return [by_name[name] for name in at]
    offered, smallest = [], input_bytes
    for cut in cuts:
        if cut.bytes_per_row is not None and cut.bytes_per_row < smallest:
            offered.append(cut)
            smallest = cut.bytes_per_row
    return offered


def split_member(
    member: MemberConfig,
    card: MemberCard | None,
    schema: ClassifierSchema,
    head: Site,
    tail: Site,
    label: str | None = None,
) -> Member:
    """The member served split between ``head``'s tier and ``tail``'s (the tails behind the
    tail tier's link), with its splitter."""
    assert member.split is not None and head.cfg is not None
    model_bytes = head.verified()
    model = onnx.load_from_string(model_bytes)
    signature = head.signature
    sample = {s.name: _zeros(s.shape, s.datatype, 1) for s in signature.inputs}
    input_bytes = sum(int(v.nbytes) for v in sample.values())
    tiers = head.cfg.tiers
    parts = _Parts(
        head, tail, tiers[head.place.tier].compute_slowdown, tiers[tail.place.tier].compute_slowdown
    )
    edge = parts.make(head, "split-edge", model_bytes, sample)
    returned = sum(int(v.nbytes) for v in edge.runner.run(sample, ()).values())
    paths = [
        SplitPath(EDGE, head.place.tier, edge, None),
        SplitPath(
            CLOUD,
            tail.place.tier,
            None,
            parts.make(tail, "split-cloud", model_bytes, sample),
            sent_per_row=input_bytes,
            returned_per_row=returned,
        ),
    ]
    for i, cut in enumerate(offered_cuts(model, member.split.at, input_bytes)):
        head_model, tail_model = split(model, cut.tensor)
        first = parts.make(head, f"split-{i}-head", head_model.SerializeToString(), sample)
        middle = first.runner.run(sample, (cut.tensor,))
        second = parts.make(tail, f"split-{i}-tail", tail_model.SerializeToString(), middle)
        paths.append(
            SplitPath(
                cut.tensor,
                tail.place.tier,
                first,
                second,
                cut=cut.tensor,
                sent_per_row=cut.bytes_per_row or 0,
                returned_per_row=returned,
            )
        )
    spec = member.split.policy
    policy: SplitPolicy = registry.build("split", spec.name, spec.params, SplitPolicy)
    if spec.name == "fixed" and spec.params.get("at") not in (None, *(p.option for p in paths)):
        raise EnsembleError(
            f"member {member.name!r}: split.policy.params.at {spec.params['at']!r} is no "
            f"option; options: {', '.join(p.option for p in paths)}"
        )
    built = Member(
        member.name,
        signature.inputs,
        signature.outputs,
        schema,
        paths,
        card,
        version=member.version,
        label=label,
    )
    built.splitter = Splitter(member.name, paths, policy, tail.link)
    return built


class _Parts:
    """Makes a path's parts: a session of (part of) the model, timed, on a tier."""

    def __init__(self, head: Site, tail: Site, head_slowdown: float, tail_slowdown: float):
        self._slowdown = {head.place.tier: head_slowdown, tail.place.tier: tail_slowdown}

    def make(self, site: Site, name: str, model: bytes, sample: Mapping[str, np.ndarray]) -> Part:
        session = load_session(site.path, model=model)
        runner = SessionRunner(session, read_signature(site.path, session, model))
        runner.owner = (site.owner, site.place.tier)
        for rows, runs in PROFILE_RUNS:
            feed = {k: np.repeat(v, rows, axis=0) for k, v in sample.items()}
            for _ in range(runs):
                runner.run(feed, ())
        tier = site.place.tier
        slowdown = self._slowdown[tier]
        replica: Replica = InProcessReplica(f"{tier}/{name}", tier, runner, site.engine)
        slow = SlowReplica(replica, slowdown) if slowdown > 1.0 else None
        if slow is not None:
            replica = slow
        if site.link is not None:
            linked = LinkedReplica(replica, site.link)
            linked.owner = site.owner
            replica = linked
        return Part(replica, runner, slow)


def _zeros(shape: tuple[int, ...], datatype: str, rows: int) -> np.ndarray:
    dims = [rows, *(d if d > 0 else 1 for d in shape[1:])]
    return np.zeros(dims, dtype=OIP_TO_NUMPY[datatype])
