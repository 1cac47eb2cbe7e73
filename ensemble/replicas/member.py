"""An ensemble member: its model's schema, its card, its class-probability output and replicas."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.errors import EnsembleError, InvalidInput, ModelNotReady
from ensemble.models.card import MemberCard
from ensemble.replicas.base import Replica
from ensemble.replicas.estimates import PlacementEstimate, round_trip_reader
from ensemble.replicas.split import Splitter
from ensemble.replicas.stats import HEALTHY, ReplicaStats
from ensemble.types import (
    MODEL_VERSION,
    ClassLabel,
    MemberView,
    ModelMetadata,
    PlacementView,
    ReplicaView,
    RoutingContext,
    TensorSpec,
)
from policies import registry
from policies.base import OutlierDetector, RoutingPolicy


@dataclass(frozen=True, slots=True)
class ClassifierSchema:
    """How to read class probabilities out of a model's outputs."""

    probability_output: str
    classes: tuple[ClassLabel, ...]
    logits: bool

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def infer_classifier_schema(
    name: str,
    outputs: Sequence[TensorSpec],
    *,
    probability_output: str | None,
    classes: Sequence[ClassLabel] | None,
    logits: bool,
    card: MemberCard | None,
    graph_classes: Sequence[ClassLabel] | None = None,
) -> ClassifierSchema:
    """Find the class-score output (config, card, else the only rank-2 float) and class labels
    (config, card, the graph's classifier node, else 0..C-1)."""
    by_name = {o.name: o for o in outputs}
    chosen = probability_output or (card.probability_output if card else None)
    if chosen is None:
        candidates = [
            o for o in outputs if o.datatype in ("FP32", "FP64", "FP16") and len(o.shape) == 2
        ]
        if len(candidates) != 1:
            listed = ", ".join(f"{o.name} {o.datatype}{list(o.shape)}" for o in outputs)
            raise EnsembleError(
                f"member {name!r}: cannot tell which output holds class scores ({listed}); "
                "set `probability_output` in its config"
            )
        chosen = candidates[0].name
    spec = by_name.get(chosen)
    if spec is None:
        raise EnsembleError(
            f"member {name!r}: output {chosen!r} not in the model (has {', '.join(by_name)})"
        )
    if spec.datatype not in ("FP32", "FP64", "FP16") or len(spec.shape) != 2:
        raise EnsembleError(
            f"member {name!r}: output {chosen!r} is {spec.datatype}{list(spec.shape)}; "
            "class scores must be a float tensor of shape [batch, classes]"
        )
    labels: tuple[ClassLabel, ...] = ()
    for source in (classes, card.classes if card else None, graph_classes):
        if source:
            labels = tuple(source)
            break
    width = spec.shape[1]
    if not labels:
        if width < 2:
            raise EnsembleError(
                f"member {name!r}: output {chosen!r} has no fixed class count; set `classes`"
            )
        labels = tuple(range(width))
    if width not in (-1, len(labels)):
        raise EnsembleError(
            f"member {name!r}: {len(labels)} classes configured but output {chosen!r} has {width}"
        )
    return ClassifierSchema(chosen, labels, logits)


class VersionSet(Protocol):
    """The versions a member is one of (`ensemble.replicas.versions.Versions`)."""

    def route(self, rng: random.Random) -> tuple[Member, Member | None]:
        """The version an unversioned call goes to, and a shadow version (or None)."""
        ...

    def observe(self, version: str, ok: bool, latency_s: float) -> None:
        """A finished call of ``version``."""
        ...

    def labelled(self, version: str, correct: np.ndarray) -> None:
        """Feedback labels for rows ``version`` answered."""
        ...

    def compared(self, alike: int, rows: int) -> None:
        """A shadow call's answer against the serving version's."""
        ...


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


class Member:
    """A model with replicas on one or more tiers; addressable as a model of its own."""

    def __init__(
        self,
        name: str,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        schema: ClassifierSchema | None,
        replicas: Sequence[Replica],
        card: MemberCard | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        version: str = MODEL_VERSION,
        label: str | None = None,
    ) -> None:
        if not replicas:
            raise EnsembleError(f"member {name!r} has no replicas")
        self.name = name
        self.version = version
        self.label = label or name
        """Its name in metrics and scaling: the member's, or ``NAME:VERSION`` for a version
        beyond the one its config's `model` is."""
        self.versions: VersionSet | None = None
        """The versions it is one of, when its member has several (set by `Versions`)."""
        self.splitter: Splitter | None = None
        """For a member split between two tiers: which of its paths a call takes."""
        self.inputs = inputs
        self.outputs = outputs
        self.schema = schema
        """How to read class scores out of its outputs; None for a model that is served on its
        own (a replica server) and is no classifier."""
        self.card = card
        self.clock = clock
        """What its calls, their hedges and timeouts, and outlier detection tell time by."""
        self.replicas = list(replicas)
        self._view: MemberView | None = None
        self._layout: tuple[tuple[str, tuple[Replica, ...]], ...] | None = None
        """Each tier with its serving replicas (rebuilt when the replicas change)."""
        self._trips: dict[str, Callable[[], float]] = {}
        """Each replica's round-trip reader (`round_trip_reader`)."""
        self.stats = {r.name: ReplicaStats() for r in self.replicas}
        self._by_name = {r.name: r for r in self.replicas}
        self.estimates: dict[str, PlacementEstimate] = {}
        """Live latency and failures per tier (from every call, whichever replica took it)."""
        self.cost_per_call = 0.0
        """Expected price of one call: its first tier's `cost_per_request` (set by the
        repository)."""
        self.tier_costs: dict[str, float] = {}
        """Price of one call per tier its replicas run on (set by the repository)."""
        self.rolling_accuracy: float | None = None
        """Accuracy over recent feedback, set by the feedback hub; None before any."""
        self.outlier: OutlierDetector = registry.build(
            "outlier_detection", "none", None, OutlierDetector
        )
        """Ejects failing replicas from routing (set by the repository from the config)."""
        self.draining: set[str] = set()
        """Replicas on their way out: routed to no more, closed once their calls finish."""
        self.metadata = ModelMetadata(
            name=name,
            versions=(version,),
            platform="onnxruntime_onnx",
            inputs=inputs,
            outputs=outputs,
        )

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(tier for tier, _ in self._tiers())

    def _tiers(self) -> tuple[tuple[str, tuple[Replica, ...]], ...]:
        """Each tier any replica runs on, with its replicas that are not draining."""
        layout = self._layout
        if layout is None:
            layout = self._layout = tuple(
                (
                    tier,
                    tuple(
                        r for r in self.replicas if r.tier == tier and r.name not in self.draining
                    ),
                )
                for tier in dict.fromkeys(r.tier for r in self.replicas)
            )
        return layout

    def _changed(self) -> None:
        """The replicas, or which of them drain, changed."""
        self._layout = None
        self._view = None

    def _round_trip_s(self, replica: Replica) -> float:
        read = self._trips.get(replica.name)
        if read is None:
            read = self._trips[replica.name] = round_trip_reader(replica)
        return read()

    def ready(self) -> bool:
        return any(r.ready() for r in self.replicas)

    def view(self) -> MemberView:
        """What selection policies see of this member (rebuilt only when readiness, the
        rolling accuracy or a placement's live figures change)."""
        placements = self._placements()
        view = self._view
        # Readiness follows from the placements; an unchanged placement is the same object.
        if (
            view is None
            or view.placements != placements
            or view.rolling_accuracy != self.rolling_accuracy
        ):
            ready = any(p.ready for p in placements)
            card = self.card
            per_class = None
            if card is not None:
                recall = card.per_class_accuracy
                classes = self.schema.classes if self.schema else ()
                if classes and all(str(c) in recall for c in classes):
                    per_class = tuple(recall[str(c)] for c in classes)
            seed = self._card_latency()
            view = self._view = MemberView(
                self.name,
                self.tiers,
                card.accuracy if card else None,
                ready,
                per_class_accuracy=per_class,
                cost_per_call=self.cost_per_call,
                latency_s=seed[0] if seed else None,
                latency_p95_s=seed[1] if seed else None,
                rolling_accuracy=self.rolling_accuracy,
                placements=placements,
            )
        return view

    def _card_latency(self) -> tuple[float, float] | None:
        """The card's batch-1 (p50, p99) in seconds."""
        one = self.card.latency_ms.get("batch_1") if self.card is not None else None
        return None if one is None else (one.p50_ms / 1e3, one.p99_ms / 1e3)

    def _estimate(self, tier: str) -> PlacementEstimate:
        found = self.estimates.get(tier)
        if found is None:
            found = self.estimates[tier] = PlacementEstimate(tier, self._card_latency())
        return found

    def _placements(self) -> tuple[PlacementView, ...]:
        """Each tier's live view: ready when a replica there is, the round trip the fastest
        ready replica's (any replica's while none is)."""
        now = self.clock.now()
        out = []
        for tier, serving in self._tiers():
            ready = False
            trip = 0.0
            for replica in serving:  # read on every request: loops, not comprehensions
                if replica.ready():
                    this = self._round_trip_s(replica)
                    trip = this if not ready or this < trip else trip
                    ready = True
            if not ready and serving:
                trip = min(self._round_trip_s(r) for r in serving)
            cost = self.tier_costs.get(tier, 0.0)
            out.append(self._estimate(tier).view(ready, trip, cost, now))
        return tuple(out)

    def replica_views(self) -> list[ReplicaView]:
        """What routing policies see of this member's replicas, from their live stats."""
        return [self.replica_view(r) for r in self.replicas if r.name not in self.draining]

    def serving(self, tier: str) -> list[Replica]:
        """Its replicas on ``tier`` that take calls or may again (not draining)."""
        return next((list(serving) for t, serving in self._tiers() if t == tier), [])

    def new_names(self, tier: str, count: int) -> list[str]:
        """Names for ``count`` more replicas on ``tier``: ``TIER/INDEX`` with the lowest
        indexes no replica of the member has (one scaled away frees its index again)."""
        taken = {r.name for r in self.replicas}
        names: list[str] = []
        index = 0
        for _ in range(count):
            while f"{tier}/{index}" in taken:
                index += 1
            names.append(f"{tier}/{index}")
            taken.add(names[-1])
        return names

    def add_replica(self, replica: Replica) -> None:
        """A new replica (started already) takes calls from now on."""
        if replica.name in self._by_name:
            raise EnsembleError(f"member {self.name!r} already has a replica {replica.name!r}")
        self.stats[replica.name] = ReplicaStats()
        self._by_name[replica.name] = replica
        self.replicas.append(replica)
        self._changed()

    def retire(self, name: str, drain_timeout_s: float) -> Coroutine[Any, Any, None]:
        """Route no more calls to ``name`` from now on; the coroutine returned waits for its
        calls in flight (at most ``drain_timeout_s``), then closes and forgets it. The last
        serving replica is never retired."""
        replica = self._by_name[name]
        if len(self.replicas) - len(self.draining) <= 1:
            raise EnsembleError(f"member {self.name!r} keeps its last replica")
        self.draining.add(name)
        self._changed()
        return self._drain(replica, drain_timeout_s)

    async def _drain(self, replica: Replica, drain_timeout_s: float) -> None:
        stats = self.stats[replica.name]
        deadline = self.clock.now() + drain_timeout_s
        # Polling a counter every 10 ms while a replica drains costs nothing worth an event.
        while stats.outstanding > 0 and self.clock.now() < deadline:
            await self.clock.sleep(0.01)
        self.replicas.remove(replica)
        del self._by_name[replica.name]
        del self.stats[replica.name]
        self.draining.discard(replica.name)
        self._trips.pop(replica.name, None)
        self._changed()
        await replica.close()

    def only(self) -> Replica:
        """The replica of a member that has exactly one (no routing needed)."""
        only = self.replicas[0]
        if not only.ready():
            raise ModelNotReady(f"member {self.name!r} has no ready replica")
        return only

    def route(
        self,
        routing: RoutingPolicy,
        ctx: RoutingContext,
        rng: random.Random,
        *,
        prefer: str | None = None,
    ) -> list[Replica]:
        """Replicas in the routing policy's preference order (first: the primary); never empty.
        ``prefer``: a tier whose replicas go first (the selection policy chose it), the routing
        policy's order kept within and after them.

        When outlier detection has ejected every replica the request may use, they are routed
        to anyway (Envoy's panic mode): a likely failure beats a certain one.
        """
        views = self.replica_views()
        order = routing.route(views, ctx, rng)
        if not order and any(v.ejected for v in views):
            views = [replace(v, ejected=False) for v in views]
            order = routing.route(views, ctx, rng)
        if not order:
            raise ModelNotReady(f"member {self.name!r} has no ready replica the request may use")
        replicas = [self._by_name[name] for name in order]
        if prefer is not None:
            replicas.sort(key=lambda r: r.tier != prefer)  # stable: routing's order kept
        return replicas

    def replica_view(self, replica: Replica) -> ReplicaView:
        stats = self._stats_of(replica)
        ready = replica.ready()
        if ready != stats.ready:
            stats.ready = ready
            if ready and stats.breaker is not HEALTHY:
                # Its server was down and passes its health checks again: the failures that
                # ejected it are history (Envoy un-ejects on a passing active check too).
                stats.breaker = HEALTHY
        now = self.clock.now()
        ejected = stats.breaker is not HEALTHY and self.outlier.is_ejected(stats.breaker, now)
        measured = stats.measured_at
        return ReplicaView(
            replica.name,
            replica.tier,
            ready,
            stats.outstanding,
            stats.ewma_s,
            stats.p95_s,
            ejected,
            None if measured is None else max(0.0, now - measured),
        )

    def attempt(self, replica: Replica) -> ReplicaStats:
        """An attempt goes to ``replica``: count it, and let a half-open breaker's probe out."""
        stats = self._stats_of(replica)
        stats.started()
        if stats.breaker is not HEALTHY:
            _, stats.breaker = self.outlier.allow(stats.breaker, self.clock.now())
        return stats

    def observe(
        self, replica: Replica, stats: ReplicaStats, latency_s: float, outcome: str
    ) -> None:
        """An attempt on ``replica`` ended: ``success``, ``error`` (counts against the replica:
        failures and attempt timeouts) or ``cancelled`` (a hedge's loser, a request that gave
        up: neutral)."""
        now = self.clock.now()
        stats.finished(latency_s, outcome == "success", abandoned=outcome == "cancelled", now=now)
        self._estimate(replica.tier).record(latency_s, self._round_trip_s(replica), outcome, now)
        if outcome == "cancelled":
            if stats.breaker.probe_sent_at is not None:  # a cancelled probe tells nothing:
                stats.breaker = replace(stats.breaker, probe_sent_at=None)  # let another go
            return
        state = stats.breaker
        if outcome == "success":
            if state is not HEALTHY:
                state = self.outlier.on_success(state, self.clock.now())
                stats.breaker = HEALTHY if state == HEALTHY else state
            return
        stats.breaker = self.outlier.on_failure(state, self.clock.now())
        until = stats.breaker.ejected_until
        if until is not None and until != state.ejected_until:
            stats.ejections += 1  # ejected, or ejected again after a failed probe

    def _stats_of(self, replica: Replica) -> ReplicaStats:
        """Its live stats; fresh ones for a replica scaled away after a request chose it (a
        retry may still go to it: the replica object keeps working until collected)."""
        stats = self.stats.get(replica.name)
        return stats if stats is not None else ReplicaStats()

    @property
    def classifier(self) -> ClassifierSchema:
        """Its classifier schema; an error for a model that is no classifier."""
        if self.schema is None:
            raise EnsembleError(f"member {self.name!r} has no class-score output")
        return self.schema

    @property
    def score_outputs(self) -> tuple[str, ...]:
        """The outputs to request when only class scores are needed."""
        return (self.classifier.probability_output,)

    def scores(self, result: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities [batch, classes] from a replica's outputs; raises if unusable."""
        schema = self.classifier
        scores = np.asarray(result[schema.probability_output], dtype=np.float32)
        if scores.ndim != 2 or scores.shape[1] != schema.n_classes:
            raise EnsembleError(
                f"member {self.name!r} returned scores of shape {list(scores.shape)}, "
                f"expected [batch, {schema.n_classes}]"
            )
        if schema.logits:
            scores = _softmax(scores)
        # A finite sum implies every element is finite; only otherwise look element-wise.
        if not math.isfinite(float(scores.sum())) and not np.isfinite(scores).all():
            # Extreme inputs (huge or non-finite pixels) make some models emit NaN; such an
            # answer would poison any aggregate, so it counts as this member failing.
            raise InvalidInput(f"member {self.name!r} returned non-finite class scores")
        return scores

    async def close(self) -> None:
        # At once: a process replica's close waits for its child to drain and exit.
        await asyncio.gather(*(replica.close() for replica in list(self.replicas)))
