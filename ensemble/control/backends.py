"""Backends by name: how a placement's replicas are made and which provisioner changes them.

A backend is registered once (``register``) under the name a placement's ``backend:`` gives;
the builder looks it up and never branches on backend names. Each makes one replica of a
`Site` (a member's placement being built) given its name and, for a remote backend, its
endpoint; the builder wraps it in the placement's emulated faults and link.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from ensemble.cards import card_path
from ensemble.config import (
    GatewayConfig,
    MemberConfig,
    Placement,
    ProcessReplicaConfig,
    RayDeploymentConfig,
)
from ensemble.control.provisioning import Provisioner, RayScaler, ReplicaSet, Static
from ensemble.control.ray_runtime import RayRuntime, set_target, spec_for
from ensemble.errors import EnsembleError
from ensemble.integrity import Digest
from ensemble.models.card import MemberCard
from ensemble.replicas.base import Replica, innermost
from ensemble.replicas.credentials import ClientCredentials
from ensemble.replicas.engine import InProcessEngine, SessionRunner
from ensemble.replicas.inprocess import InProcessReplica
from ensemble.replicas.links import Link
from ensemble.replicas.member import Member
from ensemble.replicas.oip_grpc import GrpcReplica
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.onnx import OnnxSignature, load_session
from ensemble.replicas.process import ProcessReplica, ReplicaCommand
from ensemble.replicas.ray import RayReplica
from ensemble.replicas.remote import HealthCheck


@dataclass
class Site:
    """One placement of a member being built: everything a backend needs to make replicas."""

    member: MemberConfig
    place: Placement
    path: Path
    """The member's model file."""
    signature: OnnxSignature
    card: MemberCard | None
    engine: InProcessEngine
    verified: Callable[[], bytes]
    """Reads the model file and checks it against its digests (ModelIntegrityError)."""
    link: Link | None = None
    """The tier's emulated link (None: not emulated)."""
    cfg: GatewayConfig | None = None
    """The gateway config (None for a model served on its own)."""
    expected: Sequence[Digest] = ()
    ray: RayRuntime | None = None
    sessions: list[ort.InferenceSession] = field(default_factory=list)
    """Spare onnxruntime sessions (the one that read the signature serves the first
    in-process replica)."""
    drain_timeout_s: float = 30.0
    label: str | None = None
    """The member version's name in metrics (default: the member's)."""

    @property
    def owner(self) -> str:
        """Whose calls its replicas' queue, compute and link time are reported under."""
        return self.label or self.member.name


MakeReplica = Callable[[Site, str, str | None], Replica]
MakeProvisioner = Callable[[Member, Site, Callable[[str], Replica]], Provisioner]


@dataclass(frozen=True)
class Backend:
    """How one backend makes replicas (``make(site, name, endpoint)``) and provisions them
    (``provisioner(member, site, grow)``, ``grow`` making one more wrapped replica)."""

    name: str
    make: MakeReplica
    provisioner: MakeProvisioner


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    if backend.name in _BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise EnsembleError(f"unknown backend {name!r}; registered: {known}") from None


def names() -> list[str]:
    return sorted(_BACKENDS)


def health_check(place: Placement) -> HealthCheck:
    return HealthCheck(
        place.health_check_interval_s, place.health_check_timeout_s, place.unhealthy_threshold
    )


# -- in-process: an onnxruntime session on the gateway's engine --------------------------------


def _inprocess(site: Site, name: str, endpoint: str | None) -> Replica:
    # Each in-process replica runs a session of its own.
    session = (
        site.sessions.pop() if site.sessions else load_session(site.path, model=site.verified())
    )
    runner = SessionRunner(session, site.signature)
    runner.owner = (site.owner, site.place.tier)
    card = site.card
    one = card.latency_ms.get("batch_1") if card is not None else None
    many = card.latency_ms.get("batch_32") if card is not None else None
    if one is not None and many is not None:  # cost estimates from the card's latency
        runner.fixed_s = one.p50_ms / 1e3
        runner.per_row_s = max(0.0, many.p50_ms - one.p50_ms) / 31e3
    return InProcessReplica(name, site.place.tier, runner, site.engine)


def _replica_set(member: Member, site: Site, grow: Callable[[str], Replica]) -> Provisioner:
    return ReplicaSet(member, site.place.tier, grow, site.drain_timeout_s)


# -- process: a child `ensemble replica` per replica -------------------------------------------


def _process(site: Site, name: str, endpoint: str | None) -> Replica:
    """A child serving the member's model (and the card the gateway reads) with the gateway's
    own request limits, so a call the gateway accepts is one its child accepts too. The child
    checks the file against the digest the gateway verified (``--sha256``) and the card when it
    loads it (and on every restart)."""
    cfg, member, place = site.cfg, site.member, site.place
    if cfg is None:
        raise EnsembleError(f"member {member.name!r}: the process backend needs a config")
    card = card_path(cfg, member)
    server = cfg.server
    sizing = place.process or ProcessReplicaConfig()
    command = ReplicaCommand(
        site.path,
        member.name,
        card if card.is_file() else None,
        # Every expected digest matched the file the gateway read, so they are all one value.
        sha256=site.expected[0].hex if site.expected else None,
        executor_threads=sizing.executor_threads,
        max_batch_size=server.max_batch_size,
        max_request_bytes=server.max_request_bytes,
        batching=server.batching,
        batch_max_rows=server.batch_max_rows,
        # Its own drain ends early enough that it exits before the gateway would kill it.
        drain_timeout_s=0.8 * sizing.stop_timeout_s,
    )
    child = ProcessReplica(
        name,
        place.tier,
        command,
        site.signature.outputs,
        timeout_s=place.timeout_s,
        health=health_check(place),
        startup_timeout_s=sizing.startup_timeout_s,
        stop_timeout_s=sizing.stop_timeout_s,
    )
    child.link = site.link  # its health checks cross the link too
    return child


# -- remote: an OIP server per endpoint --------------------------------------------------------


def _remote(kind: type[HttpReplica] | type[GrpcReplica]) -> MakeReplica:
    def make(site: Site, name: str, endpoint: str | None) -> Replica:
        assert endpoint is not None  # config validation: one endpoint per replica
        place = site.place
        remote = kind(
            name,
            place.tier,
            endpoint,
            place.remote_model or site.member.name,
            site.signature.outputs,
            timeout_s=place.timeout_s,
            health=health_check(place),
            credentials=_credentials(site),
        )
        remote.link = site.link  # its health checks cross the link too
        return remote

    return make


def _credentials(site: Site) -> ClientCredentials | None:
    """What the placement's replicas present to their servers (None: nothing)."""
    place, cfg = site.place, site.cfg
    tls, name = place.tls, place.api_key_env
    if tls is None and name is None:
        return None

    def path(given: Path | None) -> Path | None:
        if given is None or cfg is None:
            return given
        return cfg.resolve(given)

    api_key = None if name is None else os.environ.get(name)
    if name is not None and not api_key:  # checked when the config loaded; changed since
        raise EnsembleError(f"environment variable {name} (api_key_env) is not set")
    if tls is None:
        return ClientCredentials(tls=False, api_key=api_key)
    return ClientCredentials(
        tls=True,
        ca_file=path(tls.ca_file),
        cert_file=path(tls.cert_file),
        key_file=path(tls.key_file),
        api_key=api_key,
    )


def _static(member: Member, site: Site, grow: Callable[[str], Replica]) -> Provisioner:
    return Static(member, site.place.tier)


# -- ray: a Ray Serve deployment per placement -------------------------------------------------


def _ray(site: Site, name: str, endpoint: str | None) -> Replica:
    cfg, member, place, ray = site.cfg, site.member, site.place, site.ray
    if ray is None or cfg is None:
        raise EnsembleError(
            f"member {member.name!r} is placed on the ray backend, which needs Ray: "
            "`ensemble serve` starts one (or joins --ray-address)"
        )
    spec = spec_for(cfg, member, place, name, site.expected, site.label)
    sizing = place.ray or RayDeploymentConfig()
    signature = site.signature
    replica = RayReplica(
        name,
        place.tier,
        ray.handle(spec),
        ray.app,
        spec.deployment,
        spec.member,
        signature.outputs,
        timeout_s=place.timeout_s,
        health=health_check(place),
        batchable=all(t.shape[:1] == (-1,) for t in (*signature.inputs, *signature.outputs)),
        max_inflight=sizing.max_inflight_requests,
        replicas=spec.num_replicas,
        max_batch_rows=cfg.server.batch_max_rows,
    )
    replica.link = site.link
    return replica


def _ray_scaler(member: Member, site: Site, grow: Callable[[str], Replica]) -> Provisioner:
    """Serve scales the placement's deployment (a fixed one, min = max, is never asked to)."""
    tier = site.place.tier
    rays = [r for r in map(innermost, member.serving(tier)) if isinstance(r, RayReplica)]
    if len(rays) != 1:  # several deployments on one tier: their counts are not told apart
        return Static(member, tier)
    return RayScaler(member, rays[0], set_target)


register(Backend("inprocess", _inprocess, _replica_set))
register(Backend("process", _process, _replica_set))
register(Backend("oip-http", _remote(HttpReplica), _static))
register(Backend("oip-grpc", _remote(GrpcReplica), _static))
register(Backend("triton", _remote(GrpcReplica), _static))  # Triton's own OIP gRPC server
register(Backend("ray", _ray, _ray_scaler))
