"""`ensemble serve --ray-address`: the gateway and its members as one Ray Serve application.

The gateway itself runs as a Serve deployment (`GatewayDeployment`) beside the members'
deployments (`ensemble.control.ray_runtime`), serving both OIP frontends from its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ensemble.auth import ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV
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
from ensemble.replicas.ray_loopback import LOOPBACK_ENV
from ensemble.server import Addresses, Gateway

log = logging.getLogger("ensemble.ray")


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

    quiet_driver()

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
        reset_targets(app, specs)
        members = {name: member_app(spec) for name, spec in specs.items()}
        actor: dict[str, Any] = {"num_cpus": cfg.ray.gateway_num_cpus}
        if cfg.ray.gateway_tier is not None:
            actor["resources"] = {cfg.ray.gateway_tier: RESOURCE_PER_REPLICA}
        names = (ADMIN_TOKEN_ENV, API_KEYS_ENV, FEEDBACK_TOKEN_ENV)
        credentials = {name: os.environ[name] for name in names if os.environ.get(name)}
        if credentials:  # the gateway's process reads them from its environment
            actor["runtime_env"] = {"env_vars": credentials}
        gateway = serve_deployment(
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
                log.warning("Ray Serve application %s: %s", app, waiting_for(status))
                healthy = running
        progress(f"deleting Serve application {app} (the gateway drains first)")
        serve.delete(app)
        return 0
    finally:
        ray.shutdown()
