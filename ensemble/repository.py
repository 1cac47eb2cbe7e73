"""The models a gateway serves, built from config: ensembles and their members."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.config import (
    AutoscalingConfig,
    EnsembleConfig,
    GatewayConfig,
    MemberConfig,
    Placement,
    PolicySpec,
    ProcessReplicaConfig,
    ProfileConfig,
    RayDeploymentConfig,
)
from ensemble.errors import EnsembleError, ModelIntegrityError, ModelNotFound, clip
from ensemble.integrity import Digest, expected_digests, read_verified
from ensemble.links import Link, LinkedReplica, Links
from ensemble.model_checks import inputs_agree
from ensemble.models.card import MemberCard, card_path_for, load_card, load_manifest
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import InProcessEngine, SessionRunner
from ensemble.replicas.faults import DeviceReplica, FailingReplica, StragglerReplica
from ensemble.replicas.inprocess import InProcessReplica
from ensemble.replicas.member import ClassifierSchema, Member, infer_classifier_schema
from ensemble.replicas.oip_grpc import GrpcReplica
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.onnx import ClassLabel, OnnxSignature, load_session, read_signature
from ensemble.replicas.process import ProcessReplica, ReplicaCommand
from ensemble.replicas.ray_serve import RayReplica, RayRuntime, spec_for
from ensemble.replicas.remote import HealthCheck, RemoteReplica
from ensemble.types import MODEL_VERSION, ModelMetadata, TensorSpec, ValidationSet
from policies import registry
from policies.admission import AdmissionPolicy
from policies.autoscaling import AutoscalingPolicy
from policies.base import AggregationPolicy, RoutingPolicy, SelectionPolicy
from policies.registry import NoParams
from policies.reliability import (
    HedgeState,
    HedgingPolicy,
    NoRetry,
    OutlierDetector,
    RetryBudgetState,
    RetryPolicy,
)

VERSION = MODEL_VERSION
LOCAL_TIER = "local"
"""The tier label of a model served on its own by `ensemble replica` (it knows no tiers)."""


@dataclass
class Profile:
    """An operator's policy profile built for one ensemble, with its selection state."""

    name: str
    selection: SelectionPolicy
    aggregation: AggregationPolicy
    routing: RoutingPolicy
    hedging: HedgingPolicy
    state: Any = None
    spec: ProfileConfig | None = None
    """The config it was built from (a reload keeps the state of an unchanged profile)."""
    hedge_state: HedgeState = field(default_factory=lambda: HedgeState(tokens=0.0))
    retry: RetryPolicy = field(default_factory=lambda: NoRetry(NoParams()))
    retry_state: RetryBudgetState = field(default_factory=RetryBudgetState)
    on_violation: str = "degrade"
    fallback: str | None = None
    """A member asked when nothing else can answer in time (under degrade or reroute)."""

    def may_hedge(self) -> bool:
        """Spend one hedge from the budget if it has one (the hedging policy decides)."""
        allowed, self.hedge_state = self.hedging.try_hedge(self.hedge_state)
        return allowed

    def may_retry(self) -> bool:
        """Spend one retry from the budget if it has one (the retry policy decides)."""
        allowed, self.retry_state = self.retry.try_retry(self.retry_state, time.perf_counter())
        return allowed

    def first_attempt(self) -> None:
        """A member call's first attempt goes out: the budgets earn their shares."""
        self.hedge_state = self.hedging.on_primary(self.hedge_state)
        self.retry_state = self.retry.on_request(self.retry_state, time.perf_counter())

    @classmethod
    def build(cls, name: str, config: ProfileConfig) -> Profile:
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
            selection.initial_state(),
            config,
            hedging.initial_state(),
            retry,
            retry.initial_state(),
            config.on_violation,
            config.fallback,
        )

    def weights(self) -> Mapping[str, float] | None:
        """Member weights the selection policy learned, for aggregation (Exp4's)."""
        return self.selection.weights(self.state)


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
    labels: np.ndarray = field(init=False)
    accuracy_cache: dict[frozenset[str], float | None] = field(init=False, default_factory=dict)
    """Estimated accuracy per subset of members that answered (a few subsets recur)."""
    _renames: dict[str, tuple[tuple[str, str], ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = label_array(self.classes)

    def ready(self) -> bool:
        return any(m.ready() for m in self.members.values())

    def member_feed(self, member: Member, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ensemble's feed renamed (by position) to the member's own input names."""
        renames = self._renames.get(member.name)
        if renames is None:
            pairs = zip(member.inputs, self.metadata.inputs, strict=True)
            renames = tuple((spec.name, own.name) for spec, own in pairs)
            self._renames[member.name] = renames
        if all(a == b for a, b in renames):
            return feed  # the common case: same input names, no copy
        return {theirs: feed[ours] for theirs, ours in renames}


ServedModel = EnsembleModel | Member


def member_card(cfg: GatewayConfig, member: MemberConfig) -> MemberCard | None:
    """A config member's card: None when it has none beside its model, an error when the one
    its `card:` names is absent or any is unreadable."""
    return read_card(_card_path(cfg, member), member.name, required=member.card is not None)


def member_digests(
    cfg: GatewayConfig, member: MemberConfig, card: MemberCard | None
) -> tuple[Digest, ...]:
    """The digests a config member's model file must match: its config pin, its card's."""
    return expected_digests(card, _card_path(cfg, member), member.sha256)


def read_card(path: Path, member: str, *, required: bool) -> MemberCard | None:
    """A member's card; None when an optional one is absent; an error when it is unreadable."""
    if not path.is_file():
        if required:
            raise EnsembleError(f"member {member!r}: card not found: {path}")
        return None
    try:
        return load_card(path)
    except Exception as exc:
        raise EnsembleError(f"member {member!r}: unreadable card {path}: {exc}") from exc


def build_member(
    cfg: GatewayConfig,
    member: MemberConfig,
    engine: InProcessEngine,
    links: Links | None = None,
    ray: RayRuntime | None = None,
) -> Member:
    """A config's member: its replicas on every placement (across their tier's emulated link
    when it has one; `ray` placements through ``ray``'s deployments), its card, costs, outlier
    detection. Its model file must match its card's and its config's SHA-256
    (ModelIntegrityError otherwise)."""
    path = cfg.resolve(member.model)
    card = member_card(cfg, member)
    expected = member_digests(cfg, member, card)

    def link_for(tier: str) -> Link | None:
        config = cfg.tiers[tier].link
        return links.link(tier, config) if links is not None and config.emulate else None

    scalers: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {}

    def ray_replica(place: Placement, name: str, signature: OnnxSignature) -> Replica:
        if ray is None:
            raise EnsembleError(
                f"member {member.name!r} is placed on the ray backend, which needs Ray: "
                "`ensemble serve` starts one (or joins --ray-address)"
            )
        spec = spec_for(cfg, member, place, name, expected)
        sizing = place.ray or RayDeploymentConfig()
        replica = RayReplica(
            name,
            place.tier,
            ray.handle(spec),
            spec,
            ray.app,
            signature.outputs,
            timeout_s=place.timeout_s,
            health=_health_check(place),
            batchable=all(t.shape[:1] == (-1,) for t in (*signature.inputs, *signature.outputs)),
            max_inflight=sizing.max_inflight_requests,
            replicas=spec.num_replicas,
            max_batch_rows=cfg.server.batch_max_rows,
        )
        # The ray provisioner's (a fixed deployment, min = max, is never asked to change; the
        # control loop counts its replicas from the bounds).
        scalers[place.tier] = replica.scale
        return replica

    built = load_member(
        member,
        path,
        card,
        engine,
        expected=expected,
        link_for=link_for,
        ray_replica=ray_replica,
        process_replica=_process_replicas(cfg, member, expected),
    )
    built.scalers = scalers
    built.tier_costs = {t: cfg.tiers[t].cost_per_request for t in built.tiers}
    built.cost_per_call = built.tier_costs[member.placement[0].tier]
    built.outlier = registry.build(
        "outlier_detection",
        cfg.outlier_detection.name,
        cfg.outlier_detection.params,
        OutlierDetector,
    )
    return built


RayReplicaFactory = Callable[[Placement, str, OnnxSignature], Replica]
ProcessReplicaFactory = Callable[[Placement, str, OnnxSignature], ProcessReplica]


def _process_replicas(
    cfg: GatewayConfig, member: MemberConfig, expected: Sequence[Digest]
) -> ProcessReplicaFactory:
    """Makes a `process` placement's replicas: children serving the member's model (and the
    card the gateway reads) with the gateway's own request limits, so a call the gateway
    accepts is one its child accepts too. Each child checks the file against the digest the
    gateway verified (``--sha256``) and the card, when it loads it (and on every restart)."""
    card = _card_path(cfg, member)
    server = cfg.server
    # Every expected digest matched the file the gateway read, so they are all one value.
    sha256 = expected[0].hex if expected else None

    def make(place: Placement, name: str, signature: OnnxSignature) -> ProcessReplica:
        sizing = place.process or ProcessReplicaConfig()
        command = ReplicaCommand(
            cfg.resolve(member.model),
            member.name,
            card if card.is_file() else None,
            sha256=sha256,
            executor_threads=sizing.executor_threads,
            max_batch_size=server.max_batch_size,
            max_request_bytes=server.max_request_bytes,
            batching=server.batching,
            batch_max_rows=server.batch_max_rows,
            # Its own drain ends early enough that it exits before the gateway would kill it.
            drain_timeout_s=0.8 * sizing.stop_timeout_s,
        )
        return ProcessReplica(
            name,
            place.tier,
            command,
            signature.outputs,
            timeout_s=place.timeout_s,
            health=_health_check(place),
            startup_timeout_s=sizing.startup_timeout_s,
            stop_timeout_s=sizing.stop_timeout_s,
        )

    return make


def load_member(
    member: MemberConfig,
    path: Path,
    card: MemberCard | None,
    engine: InProcessEngine,
    *,
    expected: Sequence[Digest] = (),
    allow_unverified: bool = False,
    classifier: bool = True,
    link_for: Callable[[str], Link | None] | None = None,
    ray_replica: RayReplicaFactory | None = None,
    process_replica: ProcessReplicaFactory | None = None,
) -> Member:
    """Load a member's ONNX file (its schema, and sessions for in-process replicas) and make its
    replicas; ``classifier=False`` serves a model whose class scores cannot be found as is.
    Every load reads the file once, checks those bytes against the ``expected`` digests and
    hands the same bytes to onnxruntime (ModelIntegrityError on a mismatch, or with no digest
    unless ``allow_unverified``); a replica added later reads and checks the file again.
    ``link_for`` gives a tier's emulated link (None: not emulated, no wrapper at all);
    ``ray_replica`` makes a `ray` placement's replica, ``process_replica`` a `process` one's
    (it starts its child when the replica starts)."""
    if not path.is_file():
        raise EnsembleError(f"member {member.name!r}: model file not found: {path}")

    def verified() -> bytes:
        return read_verified(member.name, path, expected, allow_unverified=allow_unverified)

    model = verified()
    first = load_session(path, model=model)
    signature = read_signature(path, first, model)
    del model
    sessions = [first]  # the signature's session serves the first in-process replica

    def make(place: Placement, name: str, endpoint: str | None, link: Link | None) -> Replica:
        """One replica of ``place`` named ``name``, with its fault and link wrappers."""
        i = int(name.rsplit("/", 1)[1])
        replica: Replica
        if place.remote:
            assert endpoint is not None  # config validation
            remote = _remote_replica(member, place, name, endpoint, signature)
            remote.link = link  # its health checks cross the link too
            replica = remote
        elif place.backend == "ray":
            if ray_replica is None:
                raise EnsembleError(f"member {member.name!r}: the ray backend needs Ray")
            replica = ray_replica(place, name, signature)
            if isinstance(replica, RemoteReplica):
                replica.link = link
        elif place.backend == "process":
            if process_replica is None:
                raise EnsembleError(f"member {member.name!r}: the process backend needs a config")
            child = process_replica(place, name, signature)
            child.link = link  # its health checks cross the link too
            replica = child
        else:
            # Each in-process replica runs a session of its own.
            session = sessions.pop() if sessions else load_session(path, model=verified())
            runner = SessionRunner(session, signature)
            one = card.latency_ms.get("batch_1") if card is not None else None
            many = card.latency_ms.get("batch_32") if card is not None else None
            if one is not None and many is not None:  # cost estimates from the card's latency
                runner.fixed_s = one.p50_ms / 1e3
                runner.per_row_s = max(0.0, many.p50_ms - one.p50_ms) / 31e3
            replica = InProcessReplica(name, place.tier, runner, engine)
        if place.device is not None:
            device = place.device
            replica = DeviceReplica(replica, device.service_ms / 1e3, device.concurrency)
        if place.straggler is not None:
            late = place.straggler
            replica = StragglerReplica(
                replica, late.probability, late.delay_ms / 1e3, late.seed + i
            )
        if place.failures is not None:
            replica = FailingReplica(replica, place.failures.probability, place.failures.seed + i)
        if link is not None:  # the link sits between the gateway and the replica
            timeout_s = place.timeout_s if place.networked else None
            replica = LinkedReplica(
                replica, link, timeout_s=timeout_s, health_checked=place.networked
            )
        return replica

    replicas: list[Replica] = []
    growers: dict[str, Callable[[str], Replica]] = {}
    for place, names in zip(member.placement, member.replica_names(), strict=True):
        link = link_for(place.tier) if link_for is not None else None
        endpoints: list[str | None] = [*place.endpoints] if place.endpoints else [None] * len(names)
        replicas += [make(place, name, endpoints[k], link) for k, name in enumerate(names)]
        provisioned = not place.networked or place.backend == "process"
        if provisioned and place.tier not in growers:
            growers[place.tier] = _grower(make, place, link)  # the in-process and process ones
    try:
        schema: ClassifierSchema | None = infer_classifier_schema(
            member.name,
            signature.outputs,
            probability_output=member.probability_output,
            classes=member.classes,
            logits=member.output_kind == "logits",
            card=card,
            graph_classes=signature.graph_classes,
        )
    except EnsembleError:
        if classifier:
            raise
        schema = None
    built = Member(member.name, signature.inputs, signature.outputs, schema, replicas, card)
    built.growers = growers
    return built


def _grower(
    make: Callable[[Placement, str, str | None, Link | None], Replica],
    place: Placement,
    link: Link | None,
) -> Callable[[str], Replica]:
    """Makes one more replica of an in-process or process placement, given its name (a process
    replica's child starts with the replica)."""

    def grow(name: str) -> Replica:
        return make(place, name, None, link)

    return grow


def _remote_replica(
    member: MemberConfig, place: Placement, name: str, endpoint: str, signature: OnnxSignature
) -> RemoteReplica:
    kind = HttpReplica if place.backend == "oip-http" else GrpcReplica
    return kind(
        name,
        place.tier,
        endpoint,
        place.remote_model or member.name,
        signature.outputs,
        timeout_s=place.timeout_s,
        health=_health_check(place),
    )


def _health_check(place: Placement) -> HealthCheck:
    return HealthCheck(
        place.health_check_interval_s, place.health_check_timeout_s, place.unhealthy_threshold
    )


def replica_bounds(cfg: GatewayConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(min, max) replicas per (member, tier): a remote placement has exactly its endpoints;
    ray (Ray Serve replicas of its deployment), in-process and process placements their bounds
    (zero for a tier that may scale to zero)."""
    bounds: dict[tuple[str, str], tuple[int, int]] = {}
    for ens in cfg.ensembles:
        for member in ens.members:
            for place in member.placement:
                fixed = len(place.endpoints or ()) if place.remote else None
                low = fixed if fixed is not None else place.replicas.min
                high = fixed if fixed is not None else max(low, place.replicas.max)
                key = (member.name, place.tier)
                before = bounds.get(key, (0, 0))
                bounds[key] = (before[0] + low, before[1] + high)
    return bounds


def build_ensemble(
    cfg: GatewayConfig, ens: EnsembleConfig, members: dict[str, Member]
) -> EnsembleModel:
    """Check the members agree on inputs and classes, and wire the profile's policies."""
    first = members[ens.members[0].name]
    for m in ens.members[1:]:
        other = members[m.name]
        if not inputs_agree(first.inputs, other.inputs):  # as `validate` checks the files
            raise EnsembleError(
                f"ensemble {ens.name!r}: member {m.name!r} inputs {_specs(other.inputs)} differ "
                f"from {first.name!r} inputs {_specs(first.inputs)}"
            )
        if other.classifier.classes != first.classifier.classes:
            raise EnsembleError(
                f"ensemble {ens.name!r}: member {m.name!r} classes differ from {first.name!r}'s"
            )
    profiles = {
        name: Profile.build(name, cfg.profile(name)) for name in sorted({*cfg.policies, "default"})
    }
    n = first.classifier.n_classes
    metadata = ModelMetadata(
        name=ens.name,
        versions=(VERSION,),
        platform="ensemble",
        inputs=first.inputs,
        outputs=(
            TensorSpec("label", label_datatype(first.classifier.classes), (-1,)),
            TensorSpec("probabilities", "FP32", (-1, n)),
        ),
    )
    chosen = {m.name: members[m.name] for m in ens.members}
    return EnsembleModel(
        ens.name,
        chosen,
        profiles,
        ens.policy,
        first.classifier.classes,
        metadata,
        ens.description,
        validation_set(chosen, [_card_path(cfg, m) for m in ens.members]),
        tuple(cfg.tiers),
    )


def _card_path(cfg: GatewayConfig, member: MemberConfig) -> Path:
    return cfg.resolve(member.card) if member.card else card_path_for(cfg.resolve(member.model))


def validation_set(members: Mapping[str, Member], card_paths: list[Path]) -> ValidationSet | None:
    """Held-out labels and every member's answers on them, when all cards share one zoo.

    The labels live in the zoo manifest beside the cards; members without a card, or cards
    scored on different splits, leave the ensemble without one (policies then fall back).
    """
    if not card_paths or any(m.card is None for m in members.values()):
        return None
    directories = {p.parent for p in card_paths}
    if len(directories) != 1:
        return None
    try:
        manifest = load_manifest(directories.pop())
    except (OSError, ValueError):
        return None
    labels = np.asarray(manifest.validation_labels)
    probabilities = {}
    for name, member in members.items():
        assert member.card is not None
        probs = np.asarray(member.card.validation_probabilities, dtype=np.float32)
        if probs.shape != (len(labels), member.classifier.n_classes):
            return None
        probabilities[name] = probs
    classes = list(next(iter(members.values())).classifier.classes)
    if not all(label in classes for label in manifest.validation_labels):
        return None
    index = np.asarray([classes.index(label) for label in manifest.validation_labels])
    return ValidationSet(index, probabilities)


def label_datatype(classes: tuple[ClassLabel, ...]) -> str:
    """INT64 labels when every class label is an integer, else BYTES (UTF-8 strings)."""
    return "INT64" if all(isinstance(c, int) for c in classes) else "BYTES"


def label_array(classes: tuple[ClassLabel, ...]) -> np.ndarray:
    """Class labels as the array the `label` output indexes into."""
    if label_datatype(classes) == "INT64":
        return np.asarray(classes, dtype=np.int64)
    return np.array([str(c).encode() for c in classes], dtype=np.object_)


def _specs(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name} {s.datatype}{list(s.shape)}" for s in specs)


class Repository:
    """Every model the gateway serves, by name; each has exactly one version, ``1``."""

    def __init__(
        self,
        ensembles: list[EnsembleModel],
        members: list[Member],
        admission: PolicySpec | None = None,
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
        spec = admission or PolicySpec(name="bounded")
        self.admission: AdmissionPolicy = registry.build(
            "admission", spec.name, spec.params, AdmissionPolicy
        )
        """Who runs, waits or is shed (the gate itself lives on the dispatcher)."""
        self.autoscaling: AutoscalingConfig | None = None
        """The control loop's settings (None: no loop)."""
        self.scaling_policy: AutoscalingPolicy | None = None
        self.bounds: dict[tuple[str, str], tuple[int, int]] = {}
        """Replica bounds per (member, tier), summed over the member's placements there."""
        self.tier_prices: dict[str, float] = {}
        """Each tier's price of one replica for one hour."""
        self.tier_caps: dict[str, int] = {}
        """Tiers with a cap on replicas across their members."""
        self.drain_timeout_s = 30.0
        """How long a replica scaled away may finish its calls (server.drain_timeout_s)."""
        self._closed = False

    @classmethod
    def from_config(
        cls,
        cfg: GatewayConfig,
        engine: InProcessEngine,
        progress: Callable[[str], None] | None = None,
        links: Links | None = None,
        ray: RayRuntime | None = None,
    ) -> Repository:
        """The config's models; replicas on a tier with ``link.emulate`` cross ``links`` (the
        gateway's, which outlive reloads; a fresh set when None); `ray` placements call
        ``ray``'s deployments. Every model file that fails its integrity check is named in one
        ModelIntegrityError."""
        links = links if links is not None else Links(cfg.tiers)
        members: dict[str, Member] = {}
        refused: list[ModelIntegrityError] = []
        for ens in cfg.ensembles:
            for m in ens.members:
                if progress:
                    progress(f"loading member {m.name} from {cfg.resolve(m.model)}")
                try:
                    members[m.name] = build_member(cfg, m, engine, links, ray)
                except ModelIntegrityError as exc:  # go on: report every refused file at once
                    refused.append(exc)
        if refused:
            raise ModelIntegrityError(
                [p for exc in refused for p in exc.problems],
                [m for exc in refused for m in exc.members],
            )
        ensembles = [build_ensemble(cfg, e, members) for e in cfg.ensembles]
        repository = cls(ensembles, list(members.values()), cfg.admission)
        repository.bounds = replica_bounds(cfg)
        repository.drain_timeout_s = cfg.server.drain_timeout_s
        repository.tier_prices = {n: t.cost_per_replica_hour for n, t in cfg.tiers.items()}
        repository.tier_caps = {
            n: t.max_replicas for n, t in cfg.tiers.items() if t.max_replicas is not None
        }
        if cfg.autoscaling is not None:
            spec = cfg.autoscaling.policy
            repository.autoscaling = cfg.autoscaling
            repository.scaling_policy = registry.build(
                "autoscaling", spec.name, spec.params, AutoscalingPolicy
            )
        return repository

    @classmethod
    def single_model(
        cls,
        path: Path,
        name: str,
        engine: InProcessEngine,
        card_path: Path | None = None,
        sha256: str | None = None,
    ) -> Repository:
        """One ONNX model served on its own (the replica server): no ensemble, one in-process
        replica; its card (default: beside the model) is read when there is one. The file must
        match ``sha256`` and the card's digest when they are given; with neither it is served
        unverified (the operator named this very file)."""
        where = card_path or card_path_for(path)
        card = read_card(where, name, required=card_path is not None)
        member = MemberConfig(
            name=name, model=path, sha256=sha256, placement=[Placement(tier=LOCAL_TIER)]
        )
        expected = expected_digests(card, where, sha256)
        loaded = load_member(
            member, path, card, engine, expected=expected, allow_unverified=True, classifier=False
        )
        return cls([], [loaded])

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
