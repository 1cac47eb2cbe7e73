"""The Ray runtime: members' `ray` placements as Ray Serve deployments, placed by tier resource.

Each `ray` placement of a served version becomes one Ray Serve deployment (``MEMBER-TIER-INDEX``;
``MEMBER-vVERSION-TIER-INDEX`` for a member's further versions) of ``placement.replicas.min``
replicas, each an onnxruntime session of the member's model, scheduled on Ray nodes that offer the
tier's custom resource (a node started with ``--resources '{"cloud": 8}'`` hosts cloud members).
The gateway sees one replica per deployment and calls it through a ``DeploymentHandle``; Ray Serve
routes among the deployment's own replicas (power of two choices). All deployments of a gateway
form one Serve application (``ray.app``) whose ingress is either a small directory (the gateway
runs in its own process and started a local Ray) or the gateway itself (``ensemble serve
--ray-address``, `ensemble.serve_app`). The control loop sets a scaled deployment's replica count
through Serve's custom autoscaling policy (`follow_gateway`).

Ray is imported lazily: configs without `ray` placements never load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.cards import member_card, member_digests
from ensemble.config import GatewayConfig, MemberConfig, Placement, RayDeploymentConfig
from ensemble.errors import DeadlineExceeded, EnsembleError, ModelIntegrityError, require_extra
from ensemble.integrity import Digest, read_verified, verified_digest, verify
from ensemble.onnx_files import sha256_hex
from ensemble.replicas.ray_loopback import loopback_environment
from ensemble.replicas.remote import Outputs

log = logging.getLogger("ensemble.ray")

SERVE_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
"""Serve's own per-request access lines would double the gateway's work on two cores."""
RESOURCE_PER_REPLICA = 0.001
"""How much of its tier's custom resource a replica asks for: only nodes offering the tier can
host it, and any number of replicas fit on one node (CPUs bound them, not the tier resource)."""
LOCAL_TIER_RESOURCE = 1000.0
"""What a gateway-started local Ray offers of every tier's resource."""


def quiet_driver() -> None:
    """Serve's driver-side INFO lines (controller started, router started) are noise here."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


# -- what the config asks Ray for --------------------------------------------------------------


@dataclass(frozen=True)
class RaySpec:
    """One `ray` placement's deployment, as deployed; a reload may not change it."""

    deployment: str
    member: str
    tier: str
    model: Path
    digest: str
    """SHA-256 of the model file, checked against its card and config pin: the deployment
    runs bytes read at deploy time and refuses them unless they hash to it."""
    num_replicas: int
    """Serve replicas at start (the placement's ``replicas.min``; may be 0)."""
    max_replicas: int
    """Above ``num_replicas``: the control loop scales it (`follow_gateway`)."""
    num_cpus: float
    max_ongoing_requests: int


def deployment_name(member: str, replica: str) -> str:
    """``mlp_large`` + ``cloud/0`` -> ``mlp_large-cloud-0``; a further version's label
    (``forest:2``) -> ``forest-v2-cloud-0``."""
    return f"{member.replace(':', '-v')}-{replica.replace('/', '-')}"


def spec_for(
    cfg: GatewayConfig,
    member: MemberConfig,
    place: Placement,
    replica: str,
    expected: Sequence[Digest],
    label: str | None = None,
) -> RaySpec:
    """The deployment of one `ray` placement of ``member`` (as one version serves it;
    ``label``: that version's name, default the member's); its model file is read and checked
    against the ``expected`` digests (ModelIntegrityError on a mismatch or with none)."""
    sizing = place.ray or RayDeploymentConfig()
    path = cfg.resolve(member.model)
    digest = verified_digest(member.name, path, expected)
    return RaySpec(
        deployment_name(label or member.name, replica),
        member.name,
        place.tier,
        path,
        digest,
        place.replicas.min,
        place.replicas.max,
        sizing.num_cpus,
        sizing.max_ongoing_requests,
    )


def ray_specs(cfg: GatewayConfig) -> dict[str, RaySpec]:
    """Every `ray` placement of the config, by deployment name; ModelIntegrityError naming
    every model file that does not match its card or config pin."""
    specs: dict[str, RaySpec] = {}
    refused: list[ModelIntegrityError] = []
    for ens in cfg.ensembles:
        for config in ens.members:
            for version in config.served_versions():
                member = config.at_version(version)
                try:
                    specs.update(_version_specs(cfg, member, config.label(version)))
                except ModelIntegrityError as exc:
                    refused.append(exc)  # one report per version
    if refused:
        raise ModelIntegrityError(
            [p for exc in refused for p in exc.problems],
            [m for exc in refused for m in exc.members],
        )
    return specs


def _version_specs(cfg: GatewayConfig, member: MemberConfig, label: str) -> dict[str, RaySpec]:
    """The deployments of one served version's `ray` placements."""
    on_ray = [
        (place, replicas[0])
        for place, replicas in zip(member.placement, member.replica_names(), strict=True)
        if place.backend == "ray"
    ]
    if not on_ray:
        return {}
    expected = member_digests(cfg, member, member_card(cfg, member))
    specs = (spec_for(cfg, member, place, name, expected, label) for place, name in on_ray)
    return {spec.deployment: spec for spec in specs}


# -- the deployments (classes Ray Serve instantiates inside its replica actors) ---------------


class OnnxDeployment:
    """One Ray Serve replica of a member: an onnxruntime session of the model's bytes, which
    must hash to ``digest`` (that of the bytes the gateway read, checked against the card or
    pin, and sent): a replica refuses to start on any other bytes. ``clock``: monotonic
    seconds (tests pass their own)."""

    def __init__(
        self, name: str, model: bytes, digest: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        from ensemble.replicas.engine import SessionRunner
        from ensemble.replicas.onnx import load_session, read_signature

        self.name = name
        self.clock = clock
        verify(name, model, [Digest(digest, "its Ray deployment")], "the model bytes it received")
        path = Path(f"{name}.onnx")  # for messages only: the session loads the bytes
        session = load_session(path, model=model)
        self._runner = SessionRunner(session, read_signature(path, session, model))

    async def __call__(
        self, feed: dict[str, np.ndarray], outputs: list[str], *, time_left_s: float | None = None
    ) -> Outputs:
        """Run the model on a thread of the replica (as Serve runs a plain method), unless the
        request's time (``time_left_s`` when the gateway sent it) ran out while it waited for
        one. Time is counted from the call's arrival on this replica's own clock: the clocks of
        two nodes are never compared, so a skewed one cannot make a replica skip live work."""
        arrived = self.clock()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._run, feed, outputs, arrived, time_left_s)

    def _run(
        self,
        feed: dict[str, np.ndarray],
        outputs: list[str],
        arrived: float,
        time_left_s: float | None,
    ) -> Outputs:
        if time_left_s is not None:
            waited = self.clock() - arrived
            if waited >= time_left_s:
                raise DeadlineExceeded(
                    f"{self.name}: the request's time ran out ({time_left_s * 1000:.1f} ms left "
                    f"when sent) while the call waited {waited * 1000:.1f} ms for a thread here; "
                    "skipped"
                )
        return self._runner.run(feed, outputs)

    def ready(self) -> bool:
        return True

    def node(self) -> str:
        return node_id()


def node_id() -> str:
    """The Ray node the calling replica runs on (tests check placement with it)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


class MemberDirectory:
    """The application's ingress when the gateway runs outside Ray: holds the member
    deployments in one application and answers which they are."""

    def __init__(self, **members: Any) -> None:
        self._names = sorted(members)

    def names(self) -> list[str]:
        return self._names


# -- scaling: the control loop sets replica counts through Serve's autoscaler ---------------

_TARGETS_NAMESPACE = "ensemble"


def _target_key(app: str | None, deployment: str) -> bytes:
    return f"replicas/{app}/{deployment}".encode()


def set_target(app: str, deployment: str, replicas: int) -> None:
    """Ask Serve for ``replicas`` replicas of ``deployment`` (blocking: one write to Ray's GCS
    key-value store, which `follow_gateway` reads in Serve's controller)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(
        _target_key(app, deployment),
        str(replicas).encode(),
        overwrite=True,
        namespace=_TARGETS_NAMESPACE,
    )


def follow_gateway(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve custom autoscaling policy of a `ray` placement the gateway scales: the count
    the gateway's control loop last set (Serve clamps it to the placement's bounds), else the
    current one. Runs in Serve's controller, every control-loop step per deployment. A call
    that waits at zero replicas (nothing the gateway sends: a scaled-to-zero placement is
    skipped by routing and not health-checked) starts one, as Serve's own policy would."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(
        _target_key(ctx.app_name, ctx.deployment_name), namespace=_TARGETS_NAMESPACE
    )
    target = int(raw) if raw is not None else int(ctx.target_num_replicas)
    if target == 0 and ctx.total_num_requests > 0:
        target = 1
    return target, ctx.policy_state


def reset_targets(app: str, specs: Mapping[str, RaySpec]) -> None:
    """Start every scaled deployment at its minimum (a count left by an earlier gateway of the
    same application on a long-lived cluster must not apply)."""
    for spec in specs.values():
        if spec.max_replicas > spec.num_replicas:
            set_target(app, spec.deployment, spec.num_replicas)


class RayRuntime:
    """The Serve deployments of a gateway's `ray` placements and handles to them.

    Deployments are made once, when the gateway starts; a reload may use them (same model
    bytes, same sizing) but not change them, since redeploying would restart every replica.
    """

    def __init__(
        self, app: str, specs: Mapping[str, RaySpec], handles: Mapping[str, Any], *, owns_ray: bool
    ) -> None:
        self.app = app
        self.specs = dict(specs)
        self._handles = dict(handles)
        self._owns_ray = owns_ray

    def handle(self, spec: RaySpec) -> Any:
        """The deployment's handle; EnsembleError if the running app does not hold ``spec``."""
        deployed = self.specs.get(spec.deployment)
        if deployed is None or deployed != spec:
            what = "is new" if deployed is None else "changed"
            raise EnsembleError(
                f"ray deployment {spec.deployment} {what}: Ray deployments are made when the "
                "gateway starts and a reload cannot change them; restart the gateway"
            )
        return self._handles[spec.deployment]

    @classmethod
    def start_local(cls, cfg: GatewayConfig, progress: Callable[[str], None]) -> RayRuntime:
        """Start a private Ray on 127.0.0.1 offering every tier as a custom resource, deploy
        the config's `ray` placements, and wait until they run. Every process of that Ray
        listens on loopback only (`ray_loopback`; tests/integration/test_ray_loopback.py)."""
        require_extra("ray", "ray", "a `ray` placement")
        loopback_environment()
        if "RAY_AUTH_MODE" not in os.environ:
            # Loopback keeps the network out, not the host's other users: Ray's processes
            # inherit a random token of this start and refuse calls without it.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        import ray
        from ray import serve

        quiet_driver()
        specs = ray_specs(cfg)
        resources = {tier: LOCAL_TIER_RESOURCE for tier in cfg.tiers}
        progress(f"starting Ray on 127.0.0.1 (tiers as custom resources: {', '.join(resources)})")
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            resources=resources,
            object_store_memory=cfg.ray.object_store_mb * 2**20,
            configure_logging=False,
        )
        try:
            serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
            reset_targets(cfg.ray.app, specs)
            members = {name: member_app(spec) for name, spec in specs.items()}
            app = serve_deployment(
                MemberDirectory, name="directory", num_replicas=1, ray_actor_options={"num_cpus": 0}
            )
            deploy(app.bind(**members), cfg.ray.app, progress, timeout_s=cfg.ray.deploy_timeout_s)
            handles = {name: serve.get_deployment_handle(name, cfg.ray.app) for name in specs}
        except BaseException:
            ray.shutdown()
            raise
        return cls(cfg.ray.app, specs, handles, owns_ray=True)

    def shutdown(self) -> None:
        """Delete the deployments and stop Ray, when this runtime started it."""
        if not self._owns_ray:
            return
        import ray

        ray.shutdown()  # Ray started here: its processes, Serve's actors with them, stop


def serve_deployment(cls: type, **options: Any) -> Any:
    """``cls`` as a Serve deployment with ``options`` (Serve's decorator, applied late so
    this module imports without Ray)."""
    from ray import serve

    make: Any = serve.deployment
    return make(cls).options(logging_config=SERVE_LOGGING, **options)


def member_app(spec: RaySpec) -> Any:
    # Read again (it travels to the replicas with the deployment): still the checked files?
    model = read_verified(spec.member, spec.model, [Digest(spec.digest, "its Ray deployment")])
    sizing: dict[str, Any] = {"num_replicas": spec.num_replicas}
    if spec.max_replicas > spec.num_replicas:  # the control loop sets its count
        sizing = {
            "autoscaling_config": {
                "min_replicas": spec.num_replicas,
                "initial_replicas": spec.num_replicas,
                "max_replicas": spec.max_replicas,
                "policy": {"policy_function": f"{__name__}:follow_gateway"},
                # Serve delays custom policies' decisions too; the control loop has its own.
                "upscale_delay_s": 0,
                "downscale_delay_s": 0,
                "downscale_to_zero_delay_s": 0,
            }
        }
    return serve_deployment(
        OnnxDeployment,
        name=spec.deployment,
        **sizing,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": spec.num_cpus,
            "resources": {spec.tier: RESOURCE_PER_REPLICA},
        },
    ).bind(spec.member, model, sha256_hex(model))  # what the replicas must receive


def deploy(
    app: Any,
    name: str,
    progress: Callable[[str], None],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    route_prefix: str | None = None,
) -> None:
    """Deploy ``app`` as application ``name`` and wait until it runs, reporting what Serve is
    waiting for; EnsembleError (and the app deleted) if it fails, is not up in time (e.g. no
    node offers a tier's resource) or ``stop`` is set meanwhile."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=route_prefix, logging_config=SERVE_LOGGING)],
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            progress(f"Ray Serve application {name} is running")
            return
        waiting = waiting_for(status)
        failed = status is not None and status.status == ApplicationStatus.DEPLOY_FAILED
        stopped = stop is not None and stop.is_set()
        if failed or stopped or time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                serve.delete(name)
            if stopped:
                raise EnsembleError(f"stopped while deploying Ray Serve application {name}")
            why = "failed" if failed else f"is not running after {timeout_s:g} s"
            raise EnsembleError(f"Ray Serve application {name} {why}: {waiting}")
        if waiting != said:
            progress(f"waiting for Ray Serve: {waiting}")
            said = waiting
        time.sleep(0.5)


def waiting_for(status: Any) -> str:
    if status is None:
        return "application not created yet"
    parts = [f"application {status.status.value}"]
    if status.message:
        parts.append(status.message.strip())
    for name, deployment in status.deployments.items():
        if deployment.status.value != "HEALTHY":
            detail = f"; {deployment.message.strip()}" if deployment.message else ""
            parts.append(f"{name} {deployment.status.value}{detail}")
    return "; ".join(parts)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
