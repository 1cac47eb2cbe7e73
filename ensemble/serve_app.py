"""`ensemble serve --ray-address`: the gateway and its members as one Ray Serve application.

The gateway itself runs as a Serve deployment (`GatewayDeployment`, ``ray.gateway_replicas``
replicas, at most one per node) beside the members' deployments
(`ensemble.control.ray_runtime`). HTTP reaches it through Serve's proxy on every node, gRPC on
each replica's node at the config's gRPC port. The replicas share their state through a hub
actor (`ensemble.cluster.ray_hub`) with the rules of local workers (`ensemble.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensemble.auth import ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV
from ensemble.cluster.ray_hub import HubActor, RayHubLink
from ensemble.cluster.slots import ShareSlots
from ensemble.config import GatewayConfig
from ensemble.control.ray_runtime import (
    RESOURCE_PER_REPLICA,
    SERVE_LOGGING,
    RayRuntime,
    RaySpec,
    deploy,
    is_loopback,
    member_app,
    node_id,
    quiet_driver,
    ray_specs,
    reset_targets,
    serve_deployment,
    waiting_for,
)
from ensemble.errors import EnsembleError, require_extra
from ensemble.replicas.ray_loopback import LOOPBACK_ENV
from ensemble.server import Addresses, Gateway, tune_collector
from ensemble.worker import Worker

log = logging.getLogger("ensemble.ray")


class GatewayDeployment:
    """The gateway as a Ray Serve deployment (``ensemble serve --ray-address``).

    Its constructor starts the gateway (both OIP frontends, hot reload through the admin API)
    on an event loop of its own thread and returns once it listens, so Serve reports the
    application running only when it answers; Serve's health check fails if that loop dies.
    Deleting the application drains it like SIGTERM does.
    """

    def __init__(
        self, cfg: GatewayConfig, specs: dict[str, RaySpec], hub: str, **handles: Any
    ) -> None:
        self._runtime = RayRuntime(cfg.ray.app, specs, handles, owns_ray=False)
        self._cfg = cfg
        self._hub = hub
        self._gateway: Gateway | None = None
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
        import ray

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = self._cfg.server
        link = RayHubLink(ray.get_actor(self._hub, namespace=HUB_NAMESPACE))
        tune_collector()
        gateway = Gateway.from_config(
            self._cfg, log.info, ray=self._runtime, slots=ShareSlots(lambda: link.workers)
        )
        worker = Worker(gateway, link)
        await worker.join(link.join(0), 0)
        # HTTP comes through Serve's proxy (``http_app``); gRPC on this node's port, shared
        # with SO_REUSEPORT should two replicas ever run on one machine.
        self._addresses = await gateway.start(server.host, None, server.grpc_port, reuse_port=True)
        self._gateway = gateway
        self._started.set()
        failed = asyncio.ensure_future(gateway.wait_failed())
        stopped = asyncio.ensure_future(self._stop.wait())
        lost = asyncio.ensure_future(link.closed.wait())
        await asyncio.wait({failed, stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        await gateway.stop()
        await link.close()
        if failed.done():
            raise RuntimeError("a frontend stopped unexpectedly")
        if lost.done() and not stopped.done():
            raise RuntimeError("the hub actor is gone")

    def __serve_build_asgi_app__(self) -> Any:
        """Serve's proxy hands HTTP requests to this ASGI app on the replica's own event loop;
        it runs the gateway's app on the gateway's loop."""
        assert self._gateway is not None and self._loop is not None
        return _bridge(self._gateway.http_app, self._loop)

    def node(self) -> str:
        return node_id()

    def addresses(self) -> dict[str, str]:
        assert self._addresses is not None
        return {"grpc": self._addresses.grpc_target}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the gateway stopped: {self._error}")

    def __del__(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(self._cfg.server.drain_timeout_s + 5)


HUB_NAMESPACE = "ensemble"
"""Ray namespace of the hub actor (the driver's own namespace is anonymous)."""


def _gateway_actor(cfg: GatewayConfig) -> dict[str, Any]:
    """Ray options of each gateway replica: CPUs, the gateway tier's resource, credentials."""
    actor: dict[str, Any] = {"num_cpus": cfg.ray.gateway_num_cpus}
    if cfg.ray.gateway_tier is not None:
        actor["resources"] = {cfg.ray.gateway_tier: RESOURCE_PER_REPLICA}
    names = [ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV, *_replica_key_names(cfg)]
    credentials = {name: os.environ[name] for name in names if os.environ.get(name)}
    if credentials:  # the gateway's process reads them from its environment
        actor["runtime_env"] = {"env_vars": credentials}
    return actor


def _replica_key_names(cfg: GatewayConfig) -> list[str]:
    """The variables remote placements read their API keys from (`api_key_env`), every
    version's."""
    names = {p.api_key_env for _, member in cfg.member_specs() for p in member.placement}
    return sorted(name for name in names if name is not None)


def _gateway_sizing(cfg: GatewayConfig) -> dict[str, Any]:
    """A fixed count of gateway replicas, or Serve's autoscaling between min and max."""
    bounds = cfg.ray.gateway_replicas
    if bounds.min == bounds.max:
        return {"num_replicas": bounds.min}
    return {
        "autoscaling_config": {
            "min_replicas": bounds.min,
            "max_replicas": bounds.max,
            "target_ongoing_requests": bounds.target_ongoing_requests,
            "upscale_delay_s": bounds.upscale_delay_s,
            "downscale_delay_s": bounds.downscale_delay_s,
            "look_back_period_s": bounds.look_back_period_s,
        }
    }


def _proxy_options(cfg: GatewayConfig, port: int) -> dict[str, Any]:
    """Serve's HTTP proxy on every node: the gateway's host and HTTP port, its TLS files."""
    options: dict[str, Any] = {"host": cfg.server.host, "port": port}
    if cfg.server.tls is not None:
        tls = cfg.server.tls.resolved(cfg.base_dir)
        options |= {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        if tls.client_ca_file is not None:
            options["ssl_ca_certs"] = str(tls.client_ca_file)
    return options


def free_port(host: str) -> int:
    """A port free on ``host`` now (Serve's proxy needs a number, not 0)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _bridge(app: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """An ASGI app that runs ``app`` on ``loop`` (another thread's), its receive and send
    calls crossing back to the caller's loop; it answers lifespan events itself."""

    async def bridge(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        here = asyncio.get_running_loop()

        async def there_receive() -> Any:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), here))

        async def there_send(message: Any) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), here))

        done = asyncio.run_coroutine_threadsafe(app(scope, there_receive, there_send), loop)
        await asyncio.wrap_future(done)

    return bridge


def _config_text(cfg: GatewayConfig) -> tuple[str, str]:
    """The config file's text and absolute path (what the hub reloads from)."""
    assert cfg.source is not None
    return cfg.source.read_text(encoding="utf-8"), str(cfg.source.resolve())


def _stay_attached(
    cfg: GatewayConfig, hub: Any, stop: threading.Event, reload: threading.Event
) -> None:
    """Until ``stop``: reload every gateway replica on ``reload`` (SIGHUP), log the
    application's state when it changes."""
    import ray
    from ray import serve

    healthy = True
    while not stop.wait(1.0):
        if reload.is_set():
            reload.clear()
            result: Any = ray.get(hub.reload.remote(*_config_text(cfg)))
            log.info("SIGHUP: %s %s", result.message, result.errors or result.workers)
        status = serve.status().applications.get(cfg.ray.app)
        running = status is not None and status.status.value == "RUNNING"
        if running != healthy:
            log.warning("Ray Serve application %s: %s", cfg.ray.app, waiting_for(status))
            healthy = running


def _application(cfg: GatewayConfig, *, detached: bool) -> tuple[Any, Any]:
    """The hub actor (``detached``: it outlives the process that made it) and the Serve
    application: the gateway deployment bound to the config's `ray` deployments."""
    import ray
    from ray import serve

    specs = ray_specs(cfg)
    reset_targets(cfg.ray.app, specs)
    members = {name: member_app(spec) for name, spec in specs.items()}
    hub_name = f"{cfg.ray.app}-hub"
    options: dict[str, Any] = {"lifetime": "detached", "get_if_exists": True} if detached else {}
    hub: Any = (
        ray.remote(HubActor)
        .options(
            name=hub_name, namespace=HUB_NAMESPACE, num_cpus=0, max_concurrency=1000, **options
        )
        .remote(*_config_text(cfg))
    )
    gateway = serve_deployment(
        serve.ingress()(GatewayDeployment),
        name="gateway",
        max_replicas_per_node=1,  # two on one node would share its cores and gRPC port
        ray_actor_options=_gateway_actor(cfg),
        **_gateway_sizing(cfg),
    )
    return hub, gateway.bind(cfg, specs, hub_name, **members)


def app(args: dict[str, str]) -> Any:
    """The gateway as a Serve application built from the config file ``args["config"]``, for
    declarative deploys: KubeRay's RayService (`serveConfigV2` with import path
    `ensemble.serve_app:app`, deploy/kubernetes/rayservice.yaml) or `serve run`. Its hub is a
    detached actor (no command stays attached to own it): delete the application and the
    actor `{app}-hub` (namespace `ensemble`) together. SIGHUP reloads do not apply; reload
    through `PUT /admin/config` instead."""
    require_extra("ray", "ray", "the gateway's Serve application")
    from ensemble.config import load_config

    config = args.get("config")
    if not config:
        raise EnsembleError('the application needs its config: args {"config": PATH}')
    _, application = _application(load_config(Path(config)), detached=True)
    return application


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

    require_extra("ray", "ray", "`serve --ray-address`")

    if is_loopback(address):  # a cluster on loopback: keep Ray's idea of this node loopback
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    from ray import serve

    quiet_driver()

    progress(f"connecting to the Ray cluster at {address}")
    ray.init(
        address=address,
        _node_ip_address="127.0.0.1" if is_loopback(address) else None,
        log_to_driver=False,
        configure_logging=False,
    )
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    app, server = cfg.ray.app, cfg.server
    try:
        http_port = server.http_port or free_port(server.host)
        serve.start(
            proxy_location="EveryNode",
            http_options=_proxy_options(cfg, http_port),
            logging_config=SERVE_LOGGING,
        )
        hub, application = _application(cfg, detached=False)
        progress(f"deploying Serve application {app}: the gateway and its ray deployments")
        deploy(
            application,
            app,
            progress,
            timeout_s=cfg.ray.deploy_timeout_s,
            stop=stop,
            route_prefix="/",
        )
        where = serve.get_app_handle(app).addresses.remote().result()
        announce(Addresses(server.host, http_port, int(where["grpc"].rsplit(":", 1)[1])))
        _stay_attached(cfg, hub, stop, reload)
        progress(f"deleting Serve application {app} (the gateway drains first)")
        serve.delete(app)
        return 0
    finally:
        ray.shutdown()
