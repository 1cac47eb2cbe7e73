"""The models a gateway serves: ensembles, their members and profiles (built by
`ensemble.control.build`; one `Repository` per config, swapped whole by a hot reload)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.config import ProfileConfig, UncertaintyConfig
from ensemble.drift import InputWatch
from ensemble.errors import ModelNotFound, clip
from ensemble.replicas.adapter import MemberAdapter
from ensemble.replicas.member import Member
from ensemble.replicas.versions import Decision, Versions
from ensemble.state import Cell, LocalCell
from ensemble.types import MODEL_VERSION, ClassLabel, ModelMetadata, ValidationSet
from policies import registry
from policies.base import (
    AdmissionPolicy,
    AggregationPolicy,
    HedgeState,
    HedgingPolicy,
    RetryBudgetState,
    RetryPolicy,
    RoutingPolicy,
    SelectionPolicy,
)

VERSION = MODEL_VERSION
LOCAL_TIER = "local"
"""The tier label of a model served on its own by `ensemble replica` (it knows no tiers)."""


@dataclass
class Profile:
    """An operator's policy profile built for one ensemble: its policies (pure) and the cells
    holding what they learn and spend across requests (`ensemble.state`)."""

    name: str
    selection: SelectionPolicy
    aggregation: AggregationPolicy
    routing: RoutingPolicy
    hedging: HedgingPolicy
    retry: RetryPolicy
    learning: Cell[Any]
    """The selection policy's state (bandit weights), per request and per feedback label."""
    hedge_budget: Cell[Mapping[str, HedgeState]]
    """Each member's hedge budget (a member missing has the policy's initial one)."""
    retry_budget: Cell[RetryBudgetState]
    spec: ProfileConfig | None = None
    """The config it was built from (a reload keeps the cells of an unchanged profile)."""
    on_violation: str = "degrade"
    fallback: str | None = None
    """A member asked when nothing else can answer in time (under degrade or reroute)."""
    clock: Clock = SYSTEM_CLOCK
    uncertainty: UncertaintyConfig | None = None
    """When its answers are uncertain and whether it escalates them (None: not checked)."""

    @property
    def state(self) -> Any:
        """The selection policy's state now."""
        return self.learning.get()

    def may_hedge(self, member: str) -> bool:
        """Spend one hedge from ``member``'s budget if it has one (the hedging policy
        decides): one member's stragglers cannot spend the others' hedges."""
        hedging = self.hedging

        def spend(budgets: Mapping[str, HedgeState]) -> tuple[bool, Mapping[str, HedgeState]]:
            state = budgets.get(member) or hedging.initial_state()
            granted, state = hedging.try_hedge(state)
            return granted, {**budgets, member: state}

        return self.hedge_budget.apply(spend)

    def may_retry(self) -> bool:
        """Spend one retry from the budget if it has one (the retry policy decides)."""
        now = self.clock.now()
        return self.retry_budget.apply(lambda state: self.retry.try_retry(state, now))

    def first_attempt(self, member: str) -> None:
        """A first attempt of a call to ``member`` goes out: the budgets earn their shares."""
        hedging = self.hedging
        self.hedge_budget.update(
            lambda budgets: {
                **budgets,
                member: hedging.on_primary(budgets.get(member) or hedging.initial_state()),
            }
        )
        now = self.clock.now()
        self.retry_budget.update(lambda state: self.retry.on_request(state, now))

    @classmethod
    def build(cls, name: str, config: ProfileConfig, clock: Clock = SYSTEM_CLOCK) -> Profile:
        """The profile's policies from the registry, each cell at its policy's initial state."""
        selection: SelectionPolicy = registry.build(
            "selection", config.selection.name, config.selection.params, SelectionPolicy
        )
        aggregation: AggregationPolicy = registry.build(
            "aggregation", config.aggregation.name, config.aggregation.params, AggregationPolicy
        )
        routing: RoutingPolicy = registry.build(
            "routing", config.routing.name, config.routing.params, RoutingPolicy
        )
        hedging: HedgingPolicy = registry.build(
            "hedging", config.hedging.name, config.hedging.params, HedgingPolicy
        )
        retry: RetryPolicy = registry.build(
            "retry", config.retry.name, config.retry.params, RetryPolicy
        )
        return cls(
            name,
            selection,
            aggregation,
            routing,
            hedging,
            retry,
            LocalCell(selection.initial_state()),
            LocalCell({}),
            LocalCell(retry.initial_state()),
            config,
            config.on_violation,
            config.fallback,
            clock,
            config.uncertainty,
        )

    def weights(self) -> Mapping[str, float] | None:
        """Member weights the selection policy learned, for aggregation (Exp4's)."""
        return self.selection.weights(self.learning.get())


@dataclass
class EnsembleModel:
    """An ensemble served as one model: members, profiles and the combined output schema."""

    name: str
    members: dict[str, Member]
    profiles: dict[str, Profile]
    profile: str
    """The profile used when a request names none."""
    classes: tuple[ClassLabel, ...]
    metadata: ModelMetadata
    description: str = ""
    validation: ValidationSet | None = None
    tiers: tuple[str, ...] = ("edge", "cloud")
    watch: InputWatch | None = None
    """Its inputs against the training distribution (None: no card describes them, or the
    watch is off)."""
    adapters: dict[str, MemberAdapter] = field(default_factory=dict)
    """Members that differ from the ensemble (inputs, classes): how each maps (the others
    take the ensemble's inputs by position and answer its classes)."""
    labels: np.ndarray = field(init=False)
    accuracy_cache: dict[frozenset[str], float | None] = field(init=False, default_factory=dict)
    """Estimated accuracy per subset of members that answered (a few subsets recur)."""
    _renames: dict[str, tuple[tuple[str, str], ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = label_array(self.classes)

    def ready(self) -> bool:
        return any(m.ready() for m in self.members.values())

    def member_feed(self, member: Member, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ensemble's feed as the member takes it: through its adapter, else renamed by
        position to the member's own input names."""
        adapter = self.adapters.get(member.name)
        if adapter is not None:
            return adapter.feed(feed)
        renames = self._renames.get(member.name)
        if renames is None:
            pairs = zip(member.inputs, self.metadata.inputs, strict=True)
            renames = tuple((spec.name, own.name) for spec, own in pairs)
            self._renames[member.name] = renames
        if all(a == b for a, b in renames):
            return feed  # the common case: same input names, no copy
        return {theirs: feed[ours] for theirs, ours in renames}

    def member_scores(self, member: Member, result: dict[str, np.ndarray]) -> np.ndarray:
        """A member's answer as class probabilities in the ensemble's class order."""
        scores = member.scores(result)
        adapter = self.adapters.get(member.name)
        return scores if adapter is None else adapter.scores(scores)


ServedModel = EnsembleModel | Member


def label_datatype(classes: tuple[ClassLabel, ...]) -> str:
    """INT64 labels when every class label is an integer, else BYTES (UTF-8 strings)."""
    return "INT64" if all(isinstance(c, int) for c in classes) else "BYTES"


def label_array(classes: tuple[ClassLabel, ...]) -> np.ndarray:
    """Class labels as the array the `label` output indexes into."""
    if label_datatype(classes) == "INT64":
        return np.asarray(classes, dtype=np.int64)
    return np.array([str(c).encode() for c in classes], dtype=np.object_)


class Repository:
    """Every model the gateway serves, by name: ensembles (version ``1``) and members, each
    at its serving version, and the members' other versions."""

    def __init__(
        self,
        ensembles: list[EnsembleModel],
        members: list[Member],
        admission: AdmissionPolicy | None = None,
        *,
        versions: Sequence[Versions] = (),
        every: Sequence[Member] | None = None,
        unloaded: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.ensembles = {e.name: e for e in ensembles}
        self.members = {m.name: m for m in members}
        """Each member at the version that serves its unversioned calls."""
        self.versions = {v.name: v for v in versions}
        """Members serving several versions: all of them, and their rollouts."""
        self.every = list(every) if every is not None else list(members)
        """Every member version it serves (what it starts and closes)."""
        self.unloaded = tuple(unloaded)
        """(model, version) its config knows but does not serve."""
        for several in versions:
            several.publish = self._publish_decision
            listed = tuple(several.members)
            for member in several.members.values():
                member.metadata = replace(member.metadata, versions=listed)
        self.publish: Callable[[Decision], None] = self.apply_decision
        """Where a rollout decision goes: applied here, or (a gateway of several workers)
        ordered by the hub so every worker applies it (`ensemble.worker`)."""
        self.tiers = tuple(
            dict.fromkeys(
                [*(t for e in ensembles for t in e.tiers), *(t for m in members for t in m.tiers)]
            )
        )
        """Tier names a request's contract may name."""
        self.profile_names = frozenset(p for e in ensembles for p in e.profiles)
        self.direct = Profile.build("direct", ProfileConfig())
        """How a member addressed as a model of its own is called: default routing and retries."""
        self.admission: AdmissionPolicy = admission or registry.build(
            "admission", "bounded", None, AdmissionPolicy
        )
        """Who runs, waits or is shed (the gate itself lives on the dispatcher)."""
        self._closed = False

    async def start(self) -> None:
        """Start the replicas' background work (health checks) and process replicas' children,
        all at once; returns once every remote replica has been checked once, so readiness is
        known before traffic arrives. When a replica cannot start (a child that fails), every
        replica is closed again, so no child outlives the failure, and its error is raised."""
        replicas = [r for m in self.every for r in m.replicas]
        results = await asyncio.gather(*(r.start() for r in replicas), return_exceptions=True)
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            await self.close()
            raise failed[0]

    def holds_unloaded(self, name: str, version: str | None = None) -> bool:
        """Whether its config knows model ``name`` (at ``version``; any, when None) but does
        not serve it."""
        return any(n == name and version in (None, v) for n, v in self.unloaded)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` (at ``version``: a member's other versions are served too);
        ModelNotFound for unknown or unloaded names and versions."""
        model: ServedModel | None = self.ensembles.get(name) or self.members.get(name)
        if model is None:
            if self.holds_unloaded(name):
                raise ModelNotFound(
                    f"model {clip(name)!r} is not loaded (POST /v2/repository/models/{name}/load)"
                )
            raise ModelNotFound(
                f"unknown model {clip(name)!r}; available: {', '.join(self.names())}"
            )
        if not version:
            return model
        found: ServedModel | None = None
        if isinstance(model, EnsembleModel):
            found = model if version == VERSION else None
        elif name in self.versions:
            found = self.versions[name].get(version)
        elif model.version == version:
            found = model
        if found is not None:
            return found
        available = ", ".join(model.metadata.versions)
        if self.holds_unloaded(name, version):
            raise ModelNotFound(
                f"model {clip(name)!r} version {clip(version)!r} is not loaded "
                f"(POST /v2/repository/models/{name}/load); loaded: {available}"
            )
        raise ModelNotFound(
            f"model {clip(name)!r} has no version {clip(version)!r}; available: {available}"
        )

    def _publish_decision(self, decision: Decision) -> None:
        self.publish(decision)

    def apply_decision(self, decision: Decision) -> None:
        """Apply a rollout's decision: a promoted version serves the member's unversioned
        calls and its ensembles from now on."""
        several = self.versions.get(decision.member)
        if several is not None and several.apply(decision):
            self.serve_default(decision.member)

    def serve_default(self, name: str) -> None:
        """Member ``name``'s default version answers its unversioned calls and ensembles."""
        serving = self.versions[name].serving
        self.members[name] = serving
        for ensemble in self.ensembles.values():
            if ensemble.members.get(name, serving) is not serving:
                ensemble.members[name] = serving
                ensemble.accuracy_cache.clear()

    def names(self) -> list[str]:
        return [*self.ensembles, *self.members]

    def all_ready(self) -> bool:
        return all(e.ready() for e in self.ensembles.values()) and all(
            m.ready() for m in self.members.values()
        )

    async def close(self) -> None:
        """Stop health checks, close every replica's connections and stop process replicas'
        children, members at once (each child drains on its own); idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(member.close() for member in self.every))
