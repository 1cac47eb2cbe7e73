"""`ensemble serve`: the gateway on a config, in this process or on a Ray cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ensemble.cli.common import (
    DEFAULT_CONFIG,
    Subparsers,
    announcer,
    ensure_models,
    progress,
    read_config,
)
from ensemble.errors import EnsembleError


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = read_config(args.config)
    if cfg is None:
        return 2
    host = args.host or cfg.server.host
    http_port = cfg.server.http_port if args.http_port is None else args.http_port
    grpc_port = cfg.server.grpc_port if args.grpc_port is None else args.grpc_port

    announce = announcer("gateway", cfg.model_names())
    ray = None
    try:
        import uvloop

        from ensemble.supervisor import Supervisor, worker_count

        workers = worker_count(args.workers)
        if workers > 1 and (args.ray_address or cfg.uses_ray()):
            raise ValueError(
                "--workers above 1 does not combine with Ray yet (`--ray-address` or `ray` "
                "placements); serve with one worker"
            )
        ensure_models(cfg)
        if workers > 1:
            supervisor = Supervisor(cfg, args.config, host, http_port, grpc_port, workers, announce)
            return uvloop.run(supervisor.run())
        if args.ray_address:
            from ensemble.serve_app import serve_on_cluster

            server = cfg.server.model_copy(
                update={"host": host, "http_port": http_port, "grpc_port": grpc_port}
            )
            cfg = cfg.model_copy(update={"server": server})
            return serve_on_cluster(cfg, args.ray_address, progress, announce)
        if cfg.uses_ray():
            from ensemble.control.ray_runtime import RayRuntime

            # Before the event loop's signal handlers: ray.init installs its own.
            ray = RayRuntime.start_local(cfg, progress)
        from ensemble.server import Gateway, run_gateway

        def make() -> Gateway:
            return Gateway.from_config(cfg, progress, ray)

        return uvloop.run(run_gateway(make, host, http_port, grpc_port, announce))
    except (EnsembleError, OSError, ValueError) as exc:
        print(f"ensemble: cannot serve {args.config}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray is not None:
            progress("stopping Ray")
            ray.shutdown()


def register(sub: Subparsers) -> None:
    """Add `ensemble serve`."""
    serve = sub.add_parser(
        "serve",
        help="Run the gateway (HTTP + gRPC) on a config.",
        description=(
            "Serve the config's ensembles over OIP REST and gRPC until SIGTERM/SIGINT, then "
            "drain in-flight requests and exit 0. Builds the model zoo first when the config's "
            "model files are missing. Prints one 'ensemble gateway ready: ...' line on stdout "
            "once both frontends listen (port 0 picks free ports)."
        ),
    )
    serve.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Config YAML (default: {DEFAULT_CONFIG}).",
    )
    serve.add_argument("--host", help="Bind address (default: the config's server.host).")
    serve.add_argument(
        "--http-port", type=int, metavar="PORT", help="OIP REST port (0 = any free port)."
    )
    serve.add_argument(
        "--grpc-port", type=int, metavar="PORT", help="OIP gRPC port (0 = any free port)."
    )
    serve.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="Worker processes serving the same ports, each with its own event loop: a number, "
        "or `auto` for one per core (default: 1, this process serves). Above 1, a supervising "
        "process restarts a worker that dies, drains all on SIGTERM/SIGINT, and on SIGHUP (or "
        "PUT /admin/config to any worker) reloads the config in every worker or in none; "
        "learning, feedback, admission, link settings, scaling and /metrics are the whole "
        "gateway's (see docs/operations.md).",
    )
    serve.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="Run on an existing Ray cluster (its GCS address, as `ray start --head` prints): "
        "the gateway and its `ray` members are deployed as one Ray Serve application "
        "(config `ray.app`), the gateway on a node offering `ray.gateway_tier`'s resource, "
        "each member on a node offering its tier's; this command stays attached and deletes "
        "the application on SIGTERM/SIGINT. Without it, a config with `ray` placements "
        "starts a private Ray on 127.0.0.1 and the gateway runs in this process.",
    )
    serve.set_defaults(func=cmd_serve)
