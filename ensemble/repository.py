"""The models a gateway serves: ensembles, their members and profiles (built by
`ensemble.control.build`; one `Repository` per config, swapped whole by a hot reload)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.config import ProfileConfig, UncertaintyConfig
from ensemble.drift import InputWatch
from ensemble.errors import ModelNotFound, clip
from ensemble.replicas.adapter import MemberAdapter
from ensemble.replicas.member import Member
from ensemble.replicas.onnx import ClassLabel
from ensemble.state import Cell, LocalCell
from ensemble.types import MODEL_VERSION, ModelMetadata, ValidationSet
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
    """Every model the gateway serves, by name; each has exactly one version, ``1``."""

    def __init__(
        self,
        ensembles: list[EnsembleModel],
        members: list[Member],
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.ensembles = {e.name: e for e in ensembles}
        self.members = {m.name: m for m in members}
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
        replicas = [r for m in self.members.values() for r in m.replicas]
        results = await asyncio.gather(*(r.start() for r in replicas), return_exceptions=True)
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            await self.close()
            raise failed[0]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name``; ModelNotFound for unknown names or versions."""
        model: ServedModel | None = self.ensembles.get(name) or self.members.get(name)
        if model is None:
            raise ModelNotFound(
                f"unknown model {clip(name)!r}; available: {', '.join(self.names())}"
            )
        if version not in (None, "", VERSION):
            raise ModelNotFound(
                f"model {clip(name)!r} has no version {clip(version)!r}; available: {VERSION}"
            )
        return model

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
        await asyncio.gather(*(member.close() for member in self.members.values()))
