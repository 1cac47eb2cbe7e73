"""The gateway process: build the models, run both frontends, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ensemble import tracing
from ensemble.auth import ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV, ApiKeys, admin_credential
from ensemble.cluster.slots import Slots
from ensemble.config import GatewayConfig, ServerConfig, TlsConfig
from ensemble.control.build import Built, build
from ensemble.control.lifecycle import ModelLifecycle
from ensemble.control.loop import ControlLoop
from ensemble.control.provisioning import Fleet
from ensemble.control.ray_runtime import RayRuntime
from ensemble.control.reload import Reloader
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.frontends.connections import (
    ConnectionGuard,
    ConnectionLimits,
    GatewayHttpProtocol,
    QuietUvicorn,
    listen,
)
from ensemble.frontends.grpc import GrpcServer, start_grpc_server
from ensemble.frontends.grpc_h2 import H2GrpcServer, start_h2_grpc_server
from ensemble.frontends.http import HttpFrontend
from ensemble.frontends.limits import Offload, RequestLimits
from ensemble.frontends.routes import LocalRoutes, Reloads, SharedRoutes
from ensemble.frontends.tls_accept import tls_protocol
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.links import Links
from ensemble.tls import TlsFileError, TlsFiles, load_tls_files, server_context

log = logging.getLogger("ensemble.server")


def _tls_files(tls: TlsConfig | None) -> TlsFiles | None:
    """The TLS files read and checked (a config was checked when loaded; they may have
    changed since)."""
    if tls is None:
        return None
    try:
        return load_tls_files(tls.cert_file, tls.key_file, tls.client_ca_file)
    except TlsFileError as exc:
        raise OSError(f"server.tls.{exc.field}: {exc.message}") from None


def _tls_context(tls: TlsConfig | None, alpn: str) -> ssl.SSLContext | None:
    """A uvicorn-served frontend's TLS, offering application protocol ``alpn`` (none: plain
    text); after ``_tls_files`` checked the files."""
    if tls is None:
        return None
    return server_context(tls.cert_file, tls.key_file, tls.client_ca_file, [alpn])


@dataclass(frozen=True)
class Addresses:
    """Where a running gateway listens."""

    host: str
    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class Gateway:
    """One server: executor, models, dispatcher, and the HTTP and gRPC frontends.

    ``ensemble serve`` builds it from a config (with hot reload); ``ensemble replica`` from one
    ONNX file (no admin API). ``build`` makes the repository and its fleet on the gateway's
    engine.
    """

    def __init__(
        self,
        server: ServerConfig,
        build: Callable[[InProcessEngine], Built],
        *,
        config: GatewayConfig | None = None,
        links: Links | None = None,
        ray: RayRuntime | None = None,
        slots: Slots | None = None,
    ) -> None:
        self.server = server
        self.metrics = GatewayMetrics()
        self.links = links
        """Emulated links by tier (a gateway from a config); they outlive reloads."""
        if links is not None:
            self.metrics.links = links.readings
        self.engine = InProcessEngine(
            server.executor_threads,
            max_batch_rows=server.batch_max_rows,
            batching=server.batching,
        )
        self.engine.observe = self.metrics.record_run
        if links is not None:
            links.observe = self.metrics.record_link
        built = build(self.engine)
        self.repository = built.repository
        self._fleet = built.fleet
        self.limits = RequestLimits.of(server)
        self.offload = Offload(self.limits)
        """The thread both frontends decode large requests in."""
        self.feedback_token = os.environ.get(FEEDBACK_TOKEN_ENV) or None
        """Credential of the feedback API, read once at start; without it answers carry no
        feedback id and nothing is kept."""
        self.dispatcher = Dispatcher(
            self.repository,
            self.metrics,
            max_batch_size=server.max_batch_size,
            allow_non_finite=server.non_finite_inputs == "allow",
            feedback=self.feedback_token is not None,
            feedback_window=server.feedback_window,
            feedback_max_bytes=server.feedback_max_bytes,
            feedback_accuracy_window=server.feedback_accuracy_window,
            slots=slots,
        )
        self.reloader = (
            Reloader(
                config,
                config.source,
                self.engine,
                self.dispatcher,
                built.fleet,
                self.metrics,
                links,
                ray,
            )
            if config is not None
            else None
        )
        """Hot reload, for a gateway built from a config."""
        self.reloads: Reloads | None = self.reloader
        """What the admin API and SIGHUP reload through (all workers of a gateway together)."""
        self.lifecycle = (
            ModelLifecycle(
                lambda: self._reloader().cfg, lambda text: self._reloads().reload_text(text)
            )
            if self.reloader is not None
            else None
        )
        """Loads and unloads models (the repository extension), through ``reloads``."""
        self.shared: SharedRoutes = LocalRoutes(self.dispatcher, self.metrics)
        """The routes over state a gateway's workers share."""
        self.control = ControlLoop(lambda: self.fleet, self.metrics) if config is not None else None
        """The control loop (it acts only while the config has `autoscaling`)."""
        self._http: QuietUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: GrpcServer | None = None
        self.http_app: HttpFrontend | None = None
        """The OIP REST application, once started."""

    @classmethod
    def from_config(
        cls,
        cfg: GatewayConfig,
        progress: Callable[[str], None] | None = None,
        ray: RayRuntime | None = None,
        slots: Slots | None = None,
    ) -> Gateway:
        """The gateway of ``ensemble serve``: the config's ensembles, hot-reloadable; `ray`
        placements call ``ray``'s deployments."""
        links = Links(cfg.tiers)
        server = cfg.server
        if server.tls is not None:  # its paths are relative to the config file
            server = server.model_copy(update={"tls": server.tls.resolved(cfg.base_dir)})
        return cls(
            server,
            lambda engine: build(cfg, engine, progress, links, ray),
            config=cfg,
            links=links,
            ray=ray,
            slots=slots,
        )

    def _reloader(self) -> Reloader:
        assert self.reloader is not None
        return self.reloader

    def _reloads(self) -> Reloads:
        assert self.reloads is not None
        return self.reloads

    @property
    def fleet(self) -> Fleet:
        """The current config's provisioners (a hot reload replaces them)."""
        return self.reloader.fleet if self.reloader is not None else self._fleet

    async def start(
        self,
        host: str,
        http_port: int | None,
        grpc_port: int,
        *,
        http_socket: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> Addresses:
        """Serve on ``host``'s ports, or HTTP on ``http_socket`` (a worker's, shared with the
        others); ``reuse_port``: the gRPC port is shared by the gateway's workers. With
        ``http_port`` None no HTTP listener starts: another server (Ray Serve's proxy) calls
        ``http_app``."""
        server = self.server
        tls = _tls_files(server.tls)  # before anything starts: a bad file is the whole error
        if server.tracing.enabled:
            tracing.configure(server.tracing)
            log.info("tracing: %s to %s", server.tracing.exporter, server.tracing.endpoint)
        api_keys = ApiKeys.from_env()
        if api_keys.required:
            log.info("inference needs an API key (%d configured)", len(api_keys))
        await self.repository.start()  # first health checks: readiness known before listening
        if self.control is not None:
            self.control.start()
        conns = ConnectionLimits.of(server).fit_descriptors()
        guard = ConnectionGuard(conns, self.metrics)
        protocol: Any = functools.partial(GatewayHttpProtocol, guard=guard)
        http_tls = _tls_context(server.tls, "http/1.1")
        if http_tls is not None:
            protocol = tls_protocol(protocol, http_tls, guard)
        app = HttpFrontend(
            self.dispatcher,
            self.metrics,
            limits=self.limits,
            offload=self.offload,
            reloader=self.reloads,
            lifecycle=self.lifecycle,
            admin_token=os.environ.get(ADMIN_TOKEN_ENV),
            feedback_token=self.feedback_token,
            links=self.links,
            api_keys=api_keys,
            shared=self.shared,
        )
        self.http_app = app
        if http_port is None and http_socket is None:
            self._grpc, bound_grpc = await self._start_grpc(
                host, grpc_port, tls, api_keys, conns, reuse_port
            )
            return Addresses(host, 0, bound_grpc)
        sock = listen(host, http_port or 0) if http_socket is None else http_socket
        self._http = QuietUvicorn.of(
            app,
            protocol,
            idle_timeout_s=conns.idle_timeout_s,
            drain_timeout_s=server.drain_timeout_s,
        )
        self._http_task = await self._http.start(sock)
        self._grpc, bound_grpc = await self._start_grpc(
            host, grpc_port, tls, api_keys, conns, reuse_port
        )
        return Addresses(host, sock.getsockname()[1], bound_grpc)

    async def _start_grpc(
        self,
        host: str,
        port: int,
        tls: TlsFiles | None,
        api_keys: ApiKeys,
        conns: ConnectionLimits,
        reuse_port: bool,
    ) -> tuple[GrpcServer, int]:
        server = self.server
        common: dict[str, Any] = {
            "max_message_bytes": server.max_request_bytes,
            "limits": self.limits,
            "offload": self.offload,
            "connections": conns,
            "api_keys": api_keys,
            "reuse_port": reuse_port,
            "lifecycle": self.lifecycle,
            "admin": admin_credential(os.environ.get(ADMIN_TOKEN_ENV)),
        }
        if server.grpc_stack == "uvicorn":
            return await start_h2_grpc_server(
                self.dispatcher,
                host,
                port,
                tls=_tls_context(server.tls, "h2"),
                drain_timeout_s=server.drain_timeout_s,
                **common,
            )
        return await start_grpc_server(self.dispatcher, host, port, tls=tls, **common)

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish (bounded by drain_timeout_s)."""
        self.dispatcher.draining = True
        grace = self.server.drain_timeout_s
        waits: list[Awaitable[Any]] = []
        if self._grpc is not None:
            waits.append(self._grpc.stop(grace))
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            waits.append(self._http_task)
        await asyncio.gather(*waits, return_exceptions=True)
        if self.control is not None:
            await self.control.stop()
        await self.fleet.close()
        if self.reloader is not None:
            await self.reloader.close()
        await self.dispatcher.repository.close()
        self.engine.shutdown()
        self.offload.shutdown()
        if self.server.tracing.enabled:
            tracing.shutdown()  # the spans not exported yet

    async def wait_failed(self) -> None:
        """Returns if a frontend dies on its own (a bug, or a lost socket)."""
        if self._http_task is not None:
            await asyncio.shield(self._http_task)
        elif isinstance(self._grpc, H2GrpcServer):  # gRPC alone, on uvicorn
            await asyncio.shield(self._grpc.task)
        else:  # gRPC alone on grpc.aio, which reports no death of its own
            await asyncio.Event().wait()


YOUNG_COLLECTION_ALLOCATIONS = 10_000
"""Net allocations of container objects between collections of the cyclic collector's
youngest generation in a serving process (CPython's default: 700)."""


def tune_collector() -> None:
    """Run the cyclic collector's young collections a fourteenth as often. A request allocates
    hundreds of container objects, nearly all freed by reference counting; at CPython's 700
    the collector ran every couple of requests, scanning the requests in flight and promoting
    them into older generations, whose collections then scan everything the gateway loaded:
    8 % of a busy gateway's CPU (py-spy, 32 concurrent requests); at 10,000 its CPU per
    request fell by 9-13 % (`loadtest.bench --baseline`). What waits for a collection is the
    little cyclic garbage of a few dozen requests."""
    young, middle, oldest = gc.get_threshold()
    gc.set_threshold(max(YOUNG_COLLECTION_ALLOCATIONS, young), middle, oldest)


async def run_gateway(
    make: Callable[[], Gateway],
    host: str,
    http_port: int,
    grpc_port: int,
    announce: Callable[[Addresses], None],
    *,
    join: Callable[[Gateway], Awaitable[asyncio.Event]] | None = None,
    http_socket: socket.socket | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain; the process's exit code. ``make`` builds the
    gateway (loading its models) once the signal handlers are in place. A worker of a gateway
    of several ``join``s the others before it listens (on ``http_socket``, shared with them,
    and the gRPC port, with SO_REUSEPORT); it also stops when the returned event is set (its
    supervisor went away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Installed before the models load, so a stop request during start-up is also orderly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tune_collector()
    gateway = make()
    orphaned = await join(gateway) if join is not None else asyncio.Event()
    reloads: set[asyncio.Task[object]] = set()
    reloader = gateway.reloads

    def reload_on_sighup() -> None:
        assert reloader is not None
        task: asyncio.Task[object] = asyncio.create_task(reloader.reload_file())
        reloads.add(task)  # keep a reference until it finishes (asyncio holds tasks weakly)
        task.add_done_callback(reloads.discard)

    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    else:  # a replica server has no config to re-read; SIGHUP must not terminate it
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload"))
    addresses = await gateway.start(
        host, http_port, grpc_port, http_socket=http_socket, reuse_port=join is not None
    )
    if not stop.is_set():
        announce(addresses)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(gateway.wait_failed())
    lost = asyncio.create_task(orphaned.wait())
    await asyncio.wait({stopped, failed, lost}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if failed.done() and not stopped.done():
        log.error("a frontend stopped unexpectedly; shutting down")
        code = 1
    log.info("draining in-flight requests")
    await gateway.stop()
    stopped.cancel()
    failed.cancel()
    lost.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Drained: the process only exits now. Closing the loop would restore the default
        # handlers, and a repeated stop request (a supervisor that signals twice) would then
        # kill the exit half-way with -SIGTERM instead of 0.
        loop.remove_signal_handler(sig)
        # A repeated signal landing while the handler changes makes CPython raise "ignored
        # due to race condition": ignoring it is what this line is for.
        with contextlib.suppress(OSError):
            signal.signal(sig, signal.SIG_IGN)
    return code
