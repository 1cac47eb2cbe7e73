"""A member's versions: which one serves, and a rollout trying a candidate against it.

Each version is a `Member` of its own (its model file, replicas, stats); `Versions` routes a
member's unversioned calls among them. A rollout sends the candidate a share of the calls
(canary) or a mirrored copy of each (shadow), gathers evidence per version (errors, latency,
agreement, accuracy from feedback labels) and, once every measure has its minimum sample,
promotes the candidate or rolls it back (`judge`, pure). A decision is published (`publish`:
applied here, or ordered by the hub so every worker of a gateway applies it) and applied by
`apply`, which ignores a decision that is no longer news.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ensemble.config import RolloutConfig
from ensemble.replicas.member import Member

log = logging.getLogger("ensemble.rollout")

Phase = Literal["running", "promoted", "rolled_back"]
Verdict = Literal["promote", "rollback", "wait"]
LATENCY_WINDOW = 2048
"""Latencies kept per version for its p95 (the most recent)."""
CHECK_EVERY = 16
"""Evidence records between two judgements (a judgement sorts the latency windows)."""


@dataclass
class Evidence:
    """What one version did since the rollout began."""

    calls: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    labelled: int = 0
    correct: int = 0

    def call(self, ok: bool, latency_s: float) -> None:
        self.calls += 1
        if ok:
            self.latencies.append(latency_s)
        else:
            self.errors += 1

    def labels(self, correct: np.ndarray) -> None:
        self.labelled += int(correct.size)
        self.correct += int(np.count_nonzero(correct))

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None

    @property
    def p95_s(self) -> float | None:
        return float(np.percentile(self.latencies, 95)) if self.latencies else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class Reading:
    """One measure, the candidate against the stable version."""

    measure: str
    stable: float | None
    candidate: float | None
    verdict: Verdict
    """``wait`` until both versions have the measure's minimum sample."""

    def describe(self) -> str:
        def shown(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        said = {"promote": "within", "rollback": "past its threshold", "wait": "too few samples"}
        return (
            f"{self.measure} {shown(self.candidate)} vs {shown(self.stable)}: {said[self.verdict]}"
        )


def judge(
    rules: RolloutConfig,
    stable: Evidence,
    candidate: Evidence,
    agreement: tuple[int, int] = (0, 0),
) -> tuple[Verdict, list[Reading]]:
    """Promote when every measure the rules keep passes with its minimum sample; roll back as
    soon as one with its sample fails; else wait. ``agreement``: (rows alike, rows compared)
    of shadow calls."""
    readings: list[Reading] = []
    enough_calls = min(stable.calls, candidate.calls) >= rules.min_calls

    def read(name: str, ours: float | None, theirs: float | None, ok: bool, sample: bool) -> None:
        verdict: Verdict = "wait" if not sample else "promote" if ok else "rollback"
        readings.append(Reading(name, theirs, ours, verdict))

    if rules.max_error_rate_increase is not None:
        a, b = candidate.error_rate or 0.0, stable.error_rate or 0.0
        read("error_rate", a, b, a - b <= rules.max_error_rate_increase, enough_calls)
    if rules.max_latency_ratio is not None:
        a_s, b_s = candidate.p95_s, stable.p95_s
        # Failed calls have no latency: with none succeeding, errors decide, not latency.
        timed = enough_calls and a_s is not None and b_s is not None
        ok = (
            timed
            and a_s is not None
            and b_s is not None
            and (a_s <= b_s * rules.max_latency_ratio or a_s - b_s <= rules.latency_slack_s)
        )
        read("latency_p95_s", a_s, b_s, ok, timed)
    if rules.max_accuracy_drop is not None and rules.mode == "canary":
        a_acc, b_acc = candidate.accuracy, stable.accuracy
        labelled = min(stable.labelled, candidate.labelled) >= rules.min_labels
        ok = a_acc is not None and b_acc is not None and b_acc - a_acc <= rules.max_accuracy_drop
        read("accuracy", a_acc, b_acc, ok, labelled)
    if rules.min_agreement is not None and rules.mode == "shadow":
        alike, compared = agreement
        share = alike / compared if compared else None
        ok = share is not None and share >= rules.min_agreement
        read("agreement", share, None, ok, enough_calls and compared > 0)
    verdicts = {r.verdict for r in readings}
    if "rollback" in verdicts:
        return "rollback", readings
    if not readings or verdicts == {"promote"}:
        return ("promote" if readings else "wait"), readings
    return "wait", readings


@dataclass(frozen=True)
class Decision:
    """A rollout's outcome, as every worker applies it."""

    member: str
    candidate: str
    verdict: Literal["promote", "rollback"]
    reason: str


class Rollout:
    """A candidate version tried against the stable one; its evidence and its phase."""

    def __init__(self, rules: RolloutConfig, stable: str) -> None:
        self.rules = rules
        self.stable = stable
        self.candidate = rules.version
        self.phase: Phase = "running"
        self.reason = ""
        self.evidence = {stable: Evidence(), self.candidate: Evidence()}
        self.agreement = (0, 0)
        """Shadow rows alike and rows compared."""
        self._since_check = 0
        self.logged: tuple[tuple[str, Verdict], ...] = ()
        """Each measure's verdict when the rollout last logged its evidence."""

    def verdict(self) -> tuple[Verdict, list[Reading]]:
        return judge(
            self.rules, self.evidence[self.stable], self.evidence[self.candidate], self.agreement
        )


class Versions:
    """A member's served versions (each a `Member`), the one that serves unversioned calls,
    and its rollout."""

    def __init__(
        self,
        name: str,
        members: Sequence[Member],
        default: str,
        rollout: RolloutConfig | None = None,
    ) -> None:
        self.name = name
        self.members = {m.version: m for m in sorted(members, key=lambda m: int(m.version))}
        self.default = default
        """The stable version: what unversioned calls get, but a canary's share."""
        self.rollout = Rollout(rollout, default) if rollout is not None else None
        self.publish: Callable[[Decision], object] = self.apply
        """Where a decision goes (the repository sets it): applied here, or ordered by the
        hub for every worker."""
        self.decisions: list[Decision] = []
        for member in self.members.values():
            member.versions = self
        if rollout is not None:
            how = f"a canary of {rollout.weight:.0%}" if rollout.mode == "canary" else "a shadow"
            log.info(
                "member %r: version %s serves, version %s runs as %s (%s)",
                name,
                default,
                rollout.version,
                how,
                "decided on evidence" if rollout.auto else "decided by the admin API",
            )

    @property
    def serving(self) -> Member:
        """The version unversioned calls get (but a canary's share)."""
        return self.members[self.default]

    def get(self, version: str) -> Member | None:
        return self.members.get(version)

    def route(self, rng: random.Random) -> tuple[Member, Member | None]:
        """The version an unversioned call goes to, and a shadow version that gets a mirrored
        copy of it (None: no shadow)."""
        rollout = self.rollout
        if rollout is None or rollout.phase != "running":
            return self.serving, None
        candidate = self.members[rollout.candidate]
        if rollout.rules.mode == "shadow":
            return self.serving, candidate
        if rng.random() < rollout.rules.weight:
            return candidate, None
        return self.serving, None

    def share(self, version: str) -> float:
        """The share of unversioned calls ``version`` answers now."""
        rollout = self.rollout
        if rollout is not None and rollout.phase == "running" and rollout.rules.mode == "canary":
            if version == rollout.candidate:
                return rollout.rules.weight
            if version == self.default:
                return 1.0 - rollout.rules.weight
            return 0.0
        return 1.0 if version == self.default else 0.0

    # -- evidence ---------------------------------------------------------------------------

    def observe(self, version: str, ok: bool, latency_s: float) -> None:
        """A finished call of ``version`` (a cancelled one, whose caller gave up, counts as
        neither)."""
        evidence = self._evidence(version)
        if evidence is not None:
            evidence.call(ok, latency_s)
            self._maybe_decide()

    def labelled(self, version: str, correct: np.ndarray) -> None:
        """Feedback labels for rows ``version`` answered (True where it was right)."""
        evidence = self._evidence(version)
        if evidence is not None:
            evidence.labels(correct)
            self._maybe_decide()

    def compared(self, alike: int, rows: int) -> None:
        """A shadow call's answer against the stable version's: rows alike of rows."""
        rollout = self.rollout
        if rollout is not None and rollout.phase == "running":
            a, n = rollout.agreement
            rollout.agreement = (a + alike, n + rows)
            self._maybe_decide()

    def _evidence(self, version: str) -> Evidence | None:
        rollout = self.rollout
        if rollout is None or rollout.phase != "running":
            return None
        return rollout.evidence.get(version)

    def _maybe_decide(self) -> None:
        rollout = self.rollout
        assert rollout is not None
        rollout._since_check += 1
        if not rollout.rules.auto or rollout._since_check < CHECK_EVERY:
            return
        rollout._since_check = 0
        verdict, readings = rollout.verdict()
        reason = "; ".join(r.describe() for r in readings)
        states = tuple((r.measure, r.verdict) for r in readings)
        if states != rollout.logged:  # a measure got its sample or crossed its threshold
            rollout.logged = states
            log.info(
                "member %r: version %s against %s: %s",
                self.name,
                rollout.candidate,
                rollout.stable,
                reason,
            )
        if verdict != "wait":
            self.publish(Decision(self.name, rollout.candidate, verdict, reason))

    # -- decisions --------------------------------------------------------------------------

    def apply(self, decision: Decision) -> bool:
        """Promote or roll back the running rollout the decision is about; False (nothing
        changes) when it is not running any more, or tries another candidate."""
        rollout = self.rollout
        if rollout is None or rollout.phase != "running" or rollout.candidate != decision.candidate:
            return False
        if decision.verdict == "promote":
            rollout.phase = "promoted"
            self.default = rollout.candidate
        else:
            rollout.phase = "rolled_back"
        rollout.reason = decision.reason
        self.decisions.append(decision)
        log.warning(
            "member %r: version %s %s (%s)",
            self.name,
            decision.candidate,
            "promoted" if decision.verdict == "promote" else "rolled back",
            decision.reason,
        )
        return True

    def carry(self, old: Versions) -> None:
        """Take over ``old``'s rollout (its phase and evidence) and serving version: a reload
        that leaves this member's versions and rollout as they were."""
        if old.rollout is None or self.rollout is None:
            return
        if set(old.members) != set(self.members) or old.rollout.rules != self.rollout.rules:
            return
        self.rollout = old.rollout
        self.default = old.default
        self.decisions = list(old.decisions)

    def state(self, version: str) -> str:
        """How ``version`` serves now, for the repository index."""
        rollout = self.rollout
        if rollout is not None and version == rollout.candidate:
            if rollout.phase == "running":
                mode = rollout.rules.mode
                return f"canary {rollout.rules.weight:.0%}" if mode == "canary" else "shadow"
            if rollout.phase == "rolled_back":
                return "rolled back: " + rollout.reason
        return "serving" if version == self.default else "loaded (versioned calls only)"
