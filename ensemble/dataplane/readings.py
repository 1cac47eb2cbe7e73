"""What `/metrics` reads of the serving repository at scrape time: readiness, replicas,
placements, drift, versions and split members. Pure reads of one `Repository`; the dispatcher
hands the current one (a reload swaps it)."""

from __future__ import annotations

from ensemble.metrics.splits import SplitReading
from ensemble.metrics.versions import VersionReading
from ensemble.replicas.base import innermost
from ensemble.repository import Repository
from ensemble.types import PlacementView
from policies.split import expected_s


def readiness(repository: Repository) -> dict[str, bool]:
    return {n: repository.get(n).ready() for n in repository.names()}


def replica_states(repository: Repository) -> list[tuple[str, str, str, bool, bool, int, int]]:
    """(member, replica, tier, ready, ejected, ejections, restarts) of every replica."""
    states = []
    for m in repository.every:
        restarts = {r.name: getattr(innermost(r), "restarts", 0) for r in m.replicas}
        states += [
            (
                m.label,
                v.name,
                v.tier,
                v.ready,
                v.ejected,
                m.stats[v.name].ejections,
                restarts.get(v.name, 0),
            )
            for v in m.replica_views()
        ]
    return states


def placements(repository: Repository) -> list[tuple[str, PlacementView]]:
    return [(m.label, p) for m in repository.every for p in m.view().placements]


def drift(repository: Repository) -> list[tuple[str, float | None]]:
    ensembles = repository.ensembles.values()
    return [(e.name, e.watch.score) for e in ensembles if e.watch is not None]


def versions(repository: Repository) -> list[VersionReading]:
    """Each served version of members that serve several, with its rollout's evidence."""
    readings = []
    for name, several in repository.versions.items():
        rollout = several.rollout
        for version in several.members:
            share = several.share(version)
            evidence = rollout.evidence.get(version) if rollout is not None else None
            if rollout is None or evidence is None:
                readings.append(VersionReading(name, version, share))
                continue
            alike, compared = rollout.agreement
            decided = [d.verdict for d in several.decisions if d.candidate == version]
            readings.append(
                VersionReading(
                    name,
                    version,
                    share,
                    rollout.phase,
                    evidence.calls,
                    evidence.errors,
                    evidence.p95_s,
                    evidence.labelled,
                    evidence.accuracy,
                    alike / compared if compared and version == rollout.candidate else None,
                    tuple((v, decided.count(v)) for v in sorted(set(decided))),
                )
            )
    return readings


def splits(repository: Repository) -> list[SplitReading]:
    """Each way each split member can run: calls it took, its expected time now, whether the
    split policy would choose it now."""
    readings = []
    for member in repository.every:
        splitter = member.splitter
        if splitter is None:
            continue
        ctx = splitter.context(1)
        choice = splitter.policy.choose(ctx)
        readings += [
            SplitReading(
                member.label, o.name, splitter.chosen[o.name], expected_s(o, ctx), o.name == choice
            )
            for o in ctx.options
        ]
    return readings
