"""The ray backend: members as Ray Serve deployments, placed by tier resource, called by handle.

Each `ray` placement becomes one Ray Serve deployment (``MEMBER-TIER-INDEX``) of
``placement.replicas.min`` replicas, each an onnxruntime session of the member's model, scheduled
on Ray nodes that offer the tier's custom resource (a node started with ``--resources
'{"cloud": 8}'`` hosts cloud members). The gateway sees one replica per deployment and calls it
through a ``DeploymentHandle``; Ray Serve routes among the deployment's own replicas (power of two
choices). All deployments of a gateway form one Serve application (``ray.app``) whose ingress is
either a small directory (the gateway runs in its own process and started a local Ray) or the
gateway itself (``ensemble serve --ray-address``: a Serve deployment that runs both OIP
frontends on its node).

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
from typing import TYPE_CHECKING, Any

import numpy as np

from ensemble.errors import EnsembleError, InvalidInput, MemberFailed, ModelIntegrityError
from ensemble.integrity import Digest, read_verified, sha256_hex, verify
from ensemble.replicas.ray_loopback import LOOPBACK_ENV, loopback_environment
from ensemble.replicas.remote import HealthCheck, Outputs, RemoteReplica, describe
from ensemble.types import TensorSpec

if TYPE_CHECKING:
    from ensemble.config import GatewayConfig, MemberConfig, Placement
    from ensemble.server import Addresses

log = logging.getLogger("ensemble.ray")

SERVE_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
"""Serve's own per-request access lines would double the gateway's work on two cores."""
RESOURCE_PER_REPLICA = 0.001
"""How much of its tier's custom resource a replica asks for: only nodes offering the tier can
host it, and any number of replicas fit on one node (CPUs bound them, not the tier resource)."""
LOCAL_TIER_RESOURCE = 1000.0
"""What a gateway-started local Ray offers of every tier's resource."""


def _quiet_driver() -> None:
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
    """``mlp_large`` + ``cloud/0`` -> ``mlp_large-cloud-0``."""
    return f"{member}-{replica.replace('/', '-')}"


def spec_for(
    cfg: GatewayConfig,
    member: MemberConfig,
    place: Placement,
    replica: str,
    expected: Sequence[Digest],
) -> RaySpec:
    """The deployment of one `ray` placement; its model file is read and checked against the
    ``expected`` digests (ModelIntegrityError on a mismatch or with none)."""
    from ensemble.config import RayDeploymentConfig

    sizing = place.ray or RayDeploymentConfig()
    path = cfg.resolve(member.model)
    digest = sha256_hex(read_verified(member.name, path, expected))
    return RaySpec(
        deployment_name(member.name, replica),
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
    from ensemble.repository import member_card, member_digests

    specs: dict[str, RaySpec] = {}
    refused: list[ModelIntegrityError] = []
    for ens in cfg.ensembles:
        for member in ens.members:
            names = member.replica_names()
            for place, replicas in zip(member.placement, names, strict=True):
                if place.backend != "ray":
                    continue
                expected = member_digests(cfg, member, member_card(cfg, member))
                try:
                    spec = spec_for(cfg, member, place, replicas[0], expected)
                except ModelIntegrityError as exc:
                    refused.append(exc)
                    break  # one report per member
                specs[spec.deployment] = spec
    if refused:
        raise ModelIntegrityError(
            [p for exc in refused for p in exc.problems],
            [m for exc in refused for m in exc.members],
        )
    return specs


# -- the deployments (classes Ray Serve instantiates inside its replica actors) ---------------


class OnnxDeployment:
    """One Ray Serve replica of a member: an onnxruntime session of the model's bytes, which
    must hash to ``digest`` (the one checked against the card or pin when the gateway read
    them): a replica refuses to start on any other bytes."""

    def __init__(self, name: str, model: bytes, digest: str) -> None:
        from ensemble.replicas.engine import SessionRunner
        from ensemble.replicas.onnx import load_session, read_signature

        self.name = name
        verify(name, model, [Digest(digest, "its Ray deployment")], "the model bytes it received")
        path = Path(f"{name}.onnx")  # for messages only: the session loads the bytes
        session = load_session(path, model=model)
        self._runner = SessionRunner(session, read_signature(path, session, model))

    def __call__(self, feed: dict[str, np.ndarray], outputs: list[str]) -> Outputs:
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


class GatewayDeployment:
    """The gateway as a Ray Serve deployment (``ensemble serve --ray-address``).

    Its constructor starts the gateway (both OIP frontends, hot reload through the admin API)
    on an event loop of its own thread and returns once it listens, so Serve reports the
    application running only when it answers; Serve's health check fails if that loop dies.
    Deleting the application drains it like SIGTERM does.
    """

    def __init__(self, cfg: GatewayConfig, specs: dict[str, RaySpec], **handles: Any) -> None:
        self._runtime = RayRuntime(cfg.ray.app, specs, handles, owns_ray=False)
        self._cfg = cfg
        self._addresses: Addresses | None = None
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ensemble gateway", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"the gateway did not start: {self._error}") from self._error

    def _run(self) -> None:
        import uvloop

        try:
            uvloop.run(self._serve())
        except BaseException as exc:  # reported by the constructor or the health check
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        from ensemble.server import Gateway

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = self._cfg.server
        gateway = Gateway.from_config(self._cfg, log.info, ray=self._runtime)
        self._addresses = await gateway.start(server.host, server.http_port, server.grpc_port)
        self._started.set()
        failed = asyncio.ensure_future(gateway.wait_failed())
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await gateway.stop()
        if failed.done():
            raise RuntimeError("a frontend stopped unexpectedly")

    def node(self) -> str:
        return node_id()

    def addresses(self) -> dict[str, str]:
        assert self._addresses is not None
        return {"http": self._addresses.http_url, "grpc": self._addresses.grpc_target}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the gateway stopped: {self._error}")

    def __del__(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(self._cfg.server.drain_timeout_s + 5)


# -- the gateway's side: replicas and the runtime that deploys them --------------------------


@dataclass(eq=False)
class _Waiting:
    """A call waiting for (or riding in) a Ray request."""

    feed: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    future: asyncio.Future[Outputs]


class RayReplica(RemoteReplica):
    """A Ray Serve deployment as one replica of a member (Ray balances its own replicas).

    A Ray Serve call costs milliseconds of CPU on each side whatever it carries (about 5 ms in
    the gateway and 4-5 ms in the Serve replica per call here, for a model that runs in 0.4
    ms), so calls are **coalesced**: at most ``max_inflight`` Ray requests are in flight per
    deployment, and calls arriving meanwhile wait and go together as one request (their rows
    concatenated, the answer split back), up to ``max_batch_rows`` rows. An idle gateway sends
    each call at once; a busy one pays Ray's overhead once per batch, not once per call
    (Clipper's adaptive batching, without a timer). A batch the model rejects is retried call
    by call, so one bad input fails only its own request. A cancelled call (a hedge's loser, a
    request past its deadline) leaves its batch; the Ray request is cancelled once nobody waits
    for it. Health checks call the deployment's ``ready`` method through the same handle.
    """

    backend = "ray"

    def __init__(
        self,
        name: str,
        tier: str,
        handle: Any,
        spec: RaySpec,
        app: str,
        outputs: Sequence[TensorSpec],
        *,
        timeout_s: float,
        health: HealthCheck,
        batchable: bool = True,
        max_inflight: int = 1,
        replicas: int = 1,
        max_batch_rows: int = 256,
    ) -> None:
        super().__init__(
            name,
            tier,
            f"ray://{app}/{spec.deployment}",
            spec.member,
            outputs,
            timeout_s=timeout_s,
            health=health,
        )
        self._handle = handle
        self._app, self._deployment = app, spec.deployment
        self.batchable = batchable
        """Every input and output has a variable first dimension, so calls can be stacked."""
        self.inflight_per_replica = max_inflight
        """Ray requests in flight per Serve replica (``max_inflight_requests``)."""
        self.replicas = replicas
        """Serve replicas of its deployment as last set; 0: scaled to zero (not routed to,
        not health-checked, so nothing wakes it but the control loop)."""
        self.max_batch_rows = max_batch_rows
        self._queue: list[_Waiting] = []
        self._inflight = 0
        self._pumping = False
        self._flights: set[asyncio.Task[None]] = set()
        self.requests_sent = 0
        """Ray requests made for calls (health checks not counted): fewer than calls under load."""

    @property
    def max_inflight(self) -> int:
        return self.inflight_per_replica * max(1, self.replicas)

    def scaled_to(self, replicas: int) -> None:
        """Its deployment now runs ``replicas`` Serve replicas (or is on its way to)."""
        self.replicas = replicas
        if replicas == 0 and self._healthy:  # unready at once, whatever the check threshold
            log.info("%s is scaled to zero", self)
            self._healthy = False
            self.last_check_error = "scaled to zero"

    async def scale(self, replicas: int) -> None:
        """The ray provisioner: have Serve run ``replicas`` replicas of the deployment."""
        await asyncio.to_thread(set_target, self._app, self._deployment, replicas)
        self.scaled_to(replicas)

    def _connect(self) -> None:
        pass  # the handle exists already

    async def _disconnect(self) -> None:
        _fail(self._queue, MemberFailed(f"{self} is closed"))
        self._queue = []
        for flight in list(self._flights):
            flight.cancel()

    async def _infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        loop = asyncio.get_running_loop()
        rows = len(next(iter(feed.values()))) if feed else 0
        waiting = _Waiting(feed, tuple(outputs), rows, loop.create_future())
        self._queue.append(waiting)
        if not self._pumping:
            # After the current tick, so calls made together leave together.
            self._pumping = True
            loop.call_soon(self._pump)
        return await waiting.future

    def _pump(self) -> None:
        self._pumping = False
        self._queue = [w for w in self._queue if not w.future.done()]
        while self._queue and self._inflight < self.max_inflight:
            batch = self._next_batch()
            self._inflight += 1
            flight = asyncio.ensure_future(self._fly(batch))
            self._flights.add(flight)
            flight.add_done_callback(self._landed)

    def _next_batch(self) -> list[_Waiting]:
        """The oldest call and the queued calls that can share its request."""
        first = self._queue.pop(0)
        batch, rows, rest = [first], first.rows, []
        key = _stack_key(first)
        for waiting in self._queue:
            fits = rows + waiting.rows <= self.max_batch_rows
            if self.batchable and fits and _stack_key(waiting) == key:
                batch.append(waiting)
                rows += waiting.rows
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    def _landed(self, flight: asyncio.Task[None]) -> None:
        self._flights.discard(flight)
        self._inflight -= 1
        if self._queue and not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    async def _fly(self, batch: list[_Waiting]) -> None:
        feed = batch[0].feed
        if len(batch) > 1:
            feed = {name: np.concatenate([w.feed[name] for w in batch]) for name in feed}
        try:
            result = await self._request(feed, batch[0].outputs, batch)
        except asyncio.CancelledError:  # the replica is closing
            _fail(batch, MemberFailed(f"{self} is closed"))
            raise
        except InvalidInput as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # Whose input was it? Each call on its own finds out.
            await asyncio.gather(*(self._fly([w]) for w in batch if not w.future.done()))
            return
        except EnsembleError as exc:
            _fail(batch, exc)
            return
        offset = 0
        for waiting in batch:
            if not waiting.future.done():
                part = {k: v[offset : offset + waiting.rows] for k, v in result.items()}
                waiting.future.set_result(part if len(batch) > 1 else result)
            offset += waiting.rows

    async def _request(
        self, feed: dict[str, np.ndarray], outputs: tuple[str, ...], batch: list[_Waiting]
    ) -> Outputs:
        """One Ray request; cancelled once every call in ``batch`` has stopped waiting."""
        self.requests_sent += 1
        response = self._handle.remote(feed, list(outputs))

        def abandon(_: object) -> None:
            if all(w.future.done() for w in batch):
                response.cancel()

        for waiting in batch:
            waiting.future.add_done_callback(abandon)
        try:
            result: Outputs = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise self._mapped(exc) from exc
        return result

    def _mapped(self, exc: Exception) -> EnsembleError:
        cause = getattr(exc, "cause", None)  # RayTaskError carries the replica's exception
        if isinstance(cause, InvalidInput):
            return InvalidInput(f"{self} rejected the input: {cause.message}")
        if isinstance(cause, EnsembleError):
            return MemberFailed(f"{self} failed: {cause.message}")
        return MemberFailed(f"{self}: {describe(cause or exc)}")

    async def _check(self) -> str | None:
        if self.replicas == 0:
            return "scaled to zero"
        response = self._handle.ready.remote()
        try:
            await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            return describe(exc)
        return None


def _stack_key(waiting: _Waiting) -> tuple[object, ...]:
    """Calls can share one request with the same outputs and the same non-batch shapes."""
    return (waiting.outputs, tuple((k, v.shape[1:], v.dtype.str) for k, v in waiting.feed.items()))


def _fail(batch: list[_Waiting], exc: BaseException) -> None:
    for waiting in batch:
        if not waiting.future.done():
            waiting.future.set_exception(exc)


# -- the ray provisioner: the control loop sets replica counts through Serve's autoscaler ----

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


def _reset_targets(app: str, specs: Mapping[str, RaySpec]) -> None:
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
        loopback_environment()
        if "RAY_AUTH_MODE" not in os.environ:
            # Loopback keeps the network out, not the host's other users: Ray's processes
            # inherit a random token of this start and refuse calls without it.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        import ray
        from ray import serve

        _quiet_driver()
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
            _reset_targets(cfg.ray.app, specs)
            members = {name: _member_app(spec) for name, spec in specs.items()}
            app = _deployment(
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


def _deployment(cls: type, **options: Any) -> Any:
    """``cls`` as a Serve deployment with ``options`` (Serve's decorator, applied late so
    this module imports without Ray)."""
    from ray import serve

    make: Any = serve.deployment
    return make(cls).options(logging_config=SERVE_LOGGING, **options)


def _member_app(spec: RaySpec) -> Any:
    # Read again (it travels to the replicas with the deployment): still the checked file?
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
    return _deployment(
        OnnxDeployment,
        name=spec.deployment,
        **sizing,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": spec.num_cpus,
            "resources": {spec.tier: RESOURCE_PER_REPLICA},
        },
    ).bind(spec.member, model, spec.digest)


def deploy(
    app: Any,
    name: str,
    progress: Callable[[str], None],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> None:
    """Deploy ``app`` as application ``name`` and wait until it runs, reporting what Serve is
    waiting for; EnsembleError (and the app deleted) if it fails, is not up in time (e.g. no
    node offers a tier's resource) or ``stop`` is set meanwhile."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=None, logging_config=SERVE_LOGGING)],
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            progress(f"Ray Serve application {name} is running")
            return
        waiting = _waiting_for(status)
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


def _waiting_for(status: Any) -> str:
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


# -- `ensemble serve --ray-address`: the gateway and its members as one Serve application -----


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def serve_on_cluster(
    cfg: GatewayConfig,
    address: str,
    progress: Callable[[str], None],
    announce: Callable[[Addresses], None],
) -> int:
    """Deploy the gateway and its `ray` placements as Serve application ``cfg.ray.app`` on the
    Ray cluster at ``address``; stay attached until SIGTERM or SIGINT, then delete the
    application (the gateway drains first). The exit code."""
    import signal

    if is_loopback(address):  # a cluster on loopback: keep Ray's idea of this node loopback
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    from ray import serve

    _quiet_driver()
    from ensemble.auth import ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV
    from ensemble.server import Addresses

    progress(f"connecting to the Ray cluster at {address}")
    ray.init(
        address=address,
        _node_ip_address="127.0.0.1" if is_loopback(address) else None,
        log_to_driver=False,
        configure_logging=False,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    app = cfg.ray.app
    try:
        serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
        specs = ray_specs(cfg)
        _reset_targets(app, specs)
        members = {name: _member_app(spec) for name, spec in specs.items()}
        actor: dict[str, Any] = {"num_cpus": cfg.ray.gateway_num_cpus}
        if cfg.ray.gateway_tier is not None:
            actor["resources"] = {cfg.ray.gateway_tier: RESOURCE_PER_REPLICA}
        names = (ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV)
        credentials = {name: os.environ[name] for name in names if os.environ.get(name)}
        if credentials:  # the gateway's process reads them from its environment
            actor["runtime_env"] = {"env_vars": credentials}
        gateway = _deployment(
            GatewayDeployment, name="gateway", num_replicas=1, ray_actor_options=actor
        )
        progress(f"deploying Serve application {app}: gateway + {len(specs)} ray deployment(s)")
        deploy(
            gateway.bind(cfg, specs, **members),
            app,
            progress,
            timeout_s=cfg.ray.deploy_timeout_s,
            stop=stop,
        )
        where = serve.get_app_handle(app).addresses.remote().result()
        http_host, http_port = where["http"].removeprefix("http://").rsplit(":", 1)
        announce(Addresses(http_host, int(http_port), int(where["grpc"].rsplit(":", 1)[1])))
        healthy = True
        while not stop.wait(2.0):
            status = serve.status().applications.get(app)
            running = status is not None and status.status.value == "RUNNING"
            if running != healthy:
                log.warning("Ray Serve application %s: %s", app, _waiting_for(status))
                healthy = running
        progress(f"deleting Serve application {app} (the gateway drains first)")
        serve.delete(app)
        return 0
    finally:
        ray.shutdown()
