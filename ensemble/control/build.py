"""Build what a config serves: the data plane's `Repository` and the control plane's `Fleet`.

Every member's model file is read once, checked against its digests and loaded; each of its
placements gets replicas from its backend (`ensemble.control.backends`), wrapped in the
placement's emulated device, faults and link, and one provisioner per (member, tier).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ensemble.cards import card_path, check_card, member_card, member_digests, read_card
from ensemble.config import EnsembleConfig, GatewayConfig, MemberConfig, Placement
from ensemble.control import backends
from ensemble.control.backends import Site
from ensemble.control.provisioning import Fleet, Key, Provisioner
from ensemble.control.ray_runtime import RayRuntime
from ensemble.control.splitting import split_member
from ensemble.drift import watch_for
from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.integrity import Digest, expected_digests, read_verified
from ensemble.models.card import MemberCard, card_path_for, load_manifest
from ensemble.replicas.adapter import MemberAdapter, adapter
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.faults import DeviceReplica, FailingReplica, SlowReplica, StragglerReplica
from ensemble.replicas.links import LinkedReplica, Links
from ensemble.replicas.member import ClassifierSchema, Member, infer_classifier_schema
from ensemble.replicas.onnx import OnnxSignature, load_session, read_signature
from ensemble.replicas.versions import Versions
from ensemble.repository import (
    LOCAL_TIER,
    VERSION,
    EnsembleModel,
    Profile,
    Repository,
    label_datatype,
)
from ensemble.types import ClassLabel, ModelMetadata, TensorSpec, ValidationSet
from policies import registry
from policies.base import AdmissionPolicy, AutoscalingPolicy, OutlierDetector


@dataclass
class Built:
    """One config, built: what requests use and what the control plane changes."""

    repository: Repository
    fleet: Fleet


def build(
    cfg: GatewayConfig,
    engine: InProcessEngine,
    progress: Callable[[str], None] | None = None,
    links: Links | None = None,
    ray: RayRuntime | None = None,
) -> Built:
    """The config's models; replicas on a tier with ``link.emulate`` cross ``links`` (the
    gateway's, which outlive reloads; a fresh set when None); `ray` placements call ``ray``'s
    deployments. Every model file that fails its integrity check is named in one
    ModelIntegrityError."""
    links = links if links is not None else Links(cfg.tiers)
    members: dict[str, Member] = {}
    fleet = Fleet(
        bounds=replica_bounds(cfg),
        tier_prices={n: t.cost_per_replica_hour for n, t in cfg.tiers.items()},
        tier_caps={n: t.max_replicas for n, t in cfg.tiers.items() if t.max_replicas is not None},
    )
    refused: list[ModelIntegrityError] = []
    versions: list[Versions] = []
    every: list[Member] = []
    for ens in cfg.ensembles:
        for m in ens.members:
            built = []
            for v in m.served_versions():
                at = m.at_version(v)
                if progress:
                    progress(f"loading member {m.name} version {v} from {cfg.resolve(at.model)}")
                try:
                    member, provisioners = build_member(cfg, at, engine, links, ray, m.label(v))
                except ModelIntegrityError as exc:  # go on: report every refused file at once
                    refused.append(exc)
                    continue
                built.append(member)
                fleet.provisioners.update(provisioners)
            every += built
            if len(built) == len(m.served_versions()) and built:
                members[m.name], several = _versions(m, built)
                versions += [several] if several is not None else []
    if refused:
        raise ModelIntegrityError(
            [p for exc in refused for p in exc.problems],
            [m for exc in refused for m in exc.members],
        )
    ensembles = [build_ensemble(cfg, e, members) for e in cfg.ensembles if e.loaded]
    spec = cfg.admission
    admission: AdmissionPolicy = registry.build(
        "admission", spec.name, spec.params, AdmissionPolicy
    )
    repository = Repository(
        ensembles, list(members.values()), admission, versions=versions, every=every,
        unloaded=unloaded_models(cfg),
    )  # fmt: skip
    if cfg.autoscaling is not None:
        scaling = cfg.autoscaling.policy
        fleet.autoscaling = cfg.autoscaling
        fleet.policy = registry.build(
            "autoscaling", scaling.name, scaling.params, AutoscalingPolicy
        )
    return Built(repository, fleet)


def _versions(config: MemberConfig, built: list[Member]) -> tuple[Member, Versions | None]:
    """The member's serving version, and its versions when it serves several (each must take
    the same inputs and answer the same classes as the first)."""
    if len(built) == 1:
        return built[0], None
    first = built[0]
    for other in built[1:]:
        if other.inputs != first.inputs or other.classifier.classes != first.classifier.classes:
            raise EnsembleError(
                f"member {config.name!r}: version {other.version} takes "
                f"{[(s.name, s.datatype) for s in other.inputs]} and answers classes "
                f"{list(other.classifier.classes)[:12]}, version {first.version} "
                f"{[(s.name, s.datatype) for s in first.inputs]} and "
                f"{list(first.classifier.classes)[:12]}; versions of a member must agree"
            )
    candidate = config.rollout.version if config.rollout else None
    default = config.default_version or max(
        (m.version for m in built if m.version != candidate), key=int
    )
    several = Versions(config.name, built, default, config.rollout)
    return several.serving, several


def unloaded_models(cfg: GatewayConfig) -> list[tuple[str, str]]:
    """(model, version) the config knows but does not serve (loaded: false)."""
    out: list[tuple[str, str]] = [(e.name, VERSION) for e in cfg.ensembles if not e.loaded]
    for ens in cfg.ensembles:
        for m in ens.members:
            served = set(m.served_versions())
            labels = [m.version, *(v.version for v in m.versions)]
            out += [(m.name, v) for v in sorted(labels, key=int) if v not in served]
    return out


def build_member(
    cfg: GatewayConfig,
    member: MemberConfig,
    engine: InProcessEngine,
    links: Links | None = None,
    ray: RayRuntime | None = None,
    label: str | None = None,
) -> tuple[Member, dict[Key, Provisioner]]:
    """A config's member and a provisioner per tier it runs on: its replicas on every
    placement (across their tier's emulated link when it has one), its card, costs, outlier
    detection. Its model file must match its card's and its config's SHA-256
    (ModelIntegrityError otherwise), and score its card's accuracy (``check_card``)."""
    card = member_card(cfg, member)
    expected = member_digests(cfg, member, card)
    path = cfg.resolve(member.model)
    verified, signature, sessions = _load(member, path, expected, allow_unverified=False)
    if card is not None:
        check_card(label or member.name, card, card_path(cfg, member), sessions[0])

    def site(place: Placement) -> Site:
        config = cfg.tiers[place.tier].link
        return Site(
            member,
            place,
            path,
            signature,
            card,
            engine,
            verified,
            link=links.link(place.tier, config) if links is not None and config.emulate else None,
            cfg=cfg,
            expected=expected,
            ray=ray,
            sessions=sessions,
            drain_timeout_s=cfg.server.drain_timeout_s,
            label=label,
        )

    if member.split is not None:
        schema = _schema(member, signature, card, classifier=True)
        assert schema is not None
        first, second = (site(p) for p in member.placement)
        built = split_member(member, card, schema, first, second, label)
        provisioners: dict[Key, Provisioner] = {}  # fixed: one head and tail set in process
    else:
        built, provisioners = _member(
            member, card, [site(p) for p in member.placement], label=label
        )
    built.tier_costs = {t: cfg.tiers[t].cost_per_request for t in built.tiers}
    built.cost_per_call = built.tier_costs[member.placement[0].tier]
    built.outlier = registry.build(
        "outlier_detection",
        cfg.outlier_detection.name,
        cfg.outlier_detection.params,
        OutlierDetector,
    )
    return built, provisioners


def single_model(
    path: Path,
    name: str,
    engine: InProcessEngine,
    card: Path | None = None,
    sha256: str | None = None,
) -> Built:
    """One ONNX model served on its own (the replica server): no ensemble, one in-process
    replica; its card (default: beside the model) is read when there is one. The file must
    match ``sha256`` and the card's digest when they are given; with neither it is served
    unverified (the operator named this very file)."""
    where = card or card_path_for(path)
    found = read_card(where, name, required=card is not None)
    member = MemberConfig(
        name=name, model=path, sha256=sha256, placement=[Placement(tier=LOCAL_TIER)]
    )
    expected = expected_digests(found, where, sha256)
    verified, signature, sessions = _load(member, path, expected, allow_unverified=True)
    if found is not None:
        check_card(name, found, where, sessions[0])
    place = member.placement[0]
    site = Site(member, place, path, signature, found, engine, verified, sessions=sessions)
    built, provisioners = _member(member, found, [site], classifier=False)
    return Built(Repository([], [built]), Fleet(provisioners))


def _load(
    member: MemberConfig, path: Path, expected: Sequence[Digest], *, allow_unverified: bool
) -> tuple[Callable[[], bytes], OnnxSignature, list[ort.InferenceSession]]:
    """Read the member's file once, check those bytes against the ``expected`` digests and hand
    the same bytes to onnxruntime (ModelIntegrityError on a mismatch, or with no digest unless
    ``allow_unverified``): a reader for later replicas (each reads and checks the file again),
    the model's signature, and the session that read it (it serves the first in-process
    replica)."""
    if not path.is_file():
        raise EnsembleError(f"member {member.name!r}: model file not found: {path}")

    def verified() -> bytes:
        return read_verified(member.name, path, expected, allow_unverified=allow_unverified)

    model = verified()
    first = load_session(path, model=model)
    return verified, read_signature(path, first, model), [first]


def _member(
    member: MemberConfig,
    card: MemberCard | None,
    sites: list[Site],
    *,
    classifier: bool = True,
    label: str | None = None,
) -> tuple[Member, dict[Key, Provisioner]]:
    """The member's replicas on every site, and a provisioner per tier (its first placement
    there decides which); ``classifier=False`` serves a model whose class scores cannot be
    found as is."""
    replicas: list[Replica] = []
    for site, names in zip(sites, member.replica_names(), strict=True):
        endpoints = [*site.place.endpoints] if site.place.endpoints else [None] * len(names)
        replicas += [make_replica(site, name, endpoints[k]) for k, name in enumerate(names)]
    signature = sites[0].signature
    schema = _schema(member, signature, card, classifier=classifier)
    built = Member(
        member.name,
        signature.inputs,
        signature.outputs,
        schema,
        replicas,
        card,
        version=member.version,
        label=label,
    )
    provisioners: dict[Key, Provisioner] = {}
    for site in sites:
        key = (built.label, site.place.tier)
        if key not in provisioners:
            grow = functools.partial(make_replica, site, endpoint=None)
            provisioners[key] = backends.backend(site.place.backend).provisioner(built, site, grow)
    return built, provisioners


def _schema(
    member: MemberConfig, signature: OnnxSignature, card: MemberCard | None, *, classifier: bool
) -> ClassifierSchema | None:
    """How to read the member's class scores; None for a model that is no classifier (an
    error when it must be one)."""
    try:
        return infer_classifier_schema(
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
        return None


def make_replica(site: Site, name: str, endpoint: str | None) -> Replica:
    """One replica of ``site`` named ``TIER/INDEX`` by its backend, inside the placement's
    emulated device, faults and link (the link sits between the gateway and the replica)."""
    place = site.place
    i = int(name.rsplit("/", 1)[1])
    replica = backends.backend(place.backend).make(site, name, endpoint)
    if place.device is not None:
        device = place.device
        replica = DeviceReplica(replica, device.service_ms / 1e3, device.concurrency)
    if place.straggler is not None:
        late = place.straggler
        replica = StragglerReplica(replica, late.probability, late.delay_ms / 1e3, late.seed + i)
    if place.failures is not None:
        replica = FailingReplica(replica, place.failures.probability, place.failures.seed + i)
    slowdown = site.cfg.tiers[place.tier].compute_slowdown if site.cfg is not None else 1.0
    if slowdown > 1.0 and place.backend in ("inprocess", "process"):
        replica = SlowReplica(replica, slowdown)
    if site.link is not None:
        timeout_s = place.timeout_s if place.networked else None
        replica = LinkedReplica(
            replica, site.link, timeout_s=timeout_s, health_checked=place.networked
        )
        replica.owner = site.owner
    return replica


def replica_bounds(cfg: GatewayConfig) -> dict[Key, tuple[int, int]]:
    """(min, max) replicas per (member, tier): a remote placement has exactly its endpoints;
    ray (Ray Serve replicas of its deployment), in-process and process placements their bounds
    (zero for a tier that may scale to zero)."""
    bounds: dict[Key, tuple[int, int]] = {}
    for ens in cfg.ensembles:
        for config in ens.members:
            for version in config.served_versions():
                member = config.at_version(version)
                label = config.label(version)
                for place in member.placement if member.split is None else ():
                    fixed = len(place.endpoints or ()) if place.remote else None
                    low = fixed if fixed is not None else place.replicas.min
                    high = fixed if fixed is not None else max(low, place.replicas.max)
                    key = (label, place.tier)
                    before = bounds.get(key, (0, 0))
                    bounds[key] = (before[0] + low, before[1] + high)
    return bounds


def build_ensemble(
    cfg: GatewayConfig, ens: EnsembleConfig, members: dict[str, Member]
) -> EnsembleModel:
    """Fit every member to the ensemble's inputs and classes (declared, else the first
    member's) and wire the profiles' policies."""
    served = [m for m in ens.members if m.loaded]
    first = members[served[0].name]
    inputs = (
        tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in ens.inputs)
        if ens.inputs
        else first.inputs
    )
    classes: tuple[ClassLabel, ...] = (
        tuple(ens.classes) if ens.classes else first.classifier.classes
    )
    index = cfg.ensembles.index(ens)
    adapters = {}
    for i, m in enumerate(ens.members):
        if not m.loaded:
            continue
        member = members[m.name]
        where = f"ensemble {ens.name!r}: ensembles[{index}].members[{i}] ({m.name})"
        fitted = adapter(
            where, member.inputs, member.classifier.classes, inputs, classes, m.inputs, m.class_map
        )
        if not fitted.plain:
            adapters[m.name] = fitted
    profiles = {
        name: Profile.build(name, cfg.profile(name)) for name in sorted({*cfg.policies, "default"})
    }
    metadata = ModelMetadata(
        name=ens.name,
        versions=(VERSION,),
        platform="ensemble",
        inputs=inputs,
        outputs=(
            TensorSpec("label", label_datatype(classes), (-1,)),
            TensorSpec("probabilities", "FP32", (-1, len(classes))),
        ),
    )
    chosen = {m.name: members[m.name] for m in served}
    return EnsembleModel(
        ens.name,
        chosen,
        profiles,
        ens.policy,
        classes,
        metadata,
        ens.description,
        validation_set(chosen, [card_path(cfg, m) for m in served], classes, adapters),
        tuple(cfg.tiers),
        watch_for(
            ens.name,
            inputs[0],
            (m.card.input_reference if m.card else None for m in chosen.values()),
            window=ens.drift.window,
            threshold=ens.drift.threshold,
        )
        if ens.drift.enabled and len(inputs) == 1
        else None,
        adapters,
    )


def validation_set(
    members: Mapping[str, Member],
    card_paths: list[Path],
    classes: tuple[ClassLabel, ...],
    adapters: Mapping[str, MemberAdapter],
) -> ValidationSet | None:
    """Held-out labels and every member's answers on them (in the ensemble's ``classes``,
    through its adapter), when all cards share one zoo.

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
        fitted = adapters.get(name)
        probabilities[name] = probs if fitted is None else fitted.scores(probs)
    known = list(classes)
    if not all(label in known for label in manifest.validation_labels):
        return None
    index = np.asarray([known.index(label) for label in manifest.validation_labels])
    return ValidationSet(index, probabilities)
