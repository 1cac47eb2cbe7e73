"""The `ensemble` command: serve, replica, validate, schema, models build, profile, loadtest."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from ensemble import __version__
from ensemble.config import (
    NAME_PATTERN,
    GatewayConfig,
    Placement,
    ServerConfig,
    TlsConfig,
    json_schema,
    load_config,
)
from ensemble.errors import ConfigError, EnsembleError, ModelIntegrityError
from ensemble.integrity import EXIT_INTEGRITY
from ensemble.models.card import card_path_for
from ensemble.tls import TlsFileError, load_tls_files

DEFAULT_CONFIG = Path("configs/default.yaml")
SCHEMA_PATH = Path("configs/schema.json")

log = logging.getLogger("ensemble")


def _progress(line: str) -> None:
    print(f"ensemble: {line}", file=sys.stderr, flush=True)


def _load(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{path}: invalid config ({len(exc.errors)} error(s))", file=sys.stderr)
        return None


def _missing_models(cfg: GatewayConfig) -> list[Path]:
    return [
        cfg.resolve(m.model)
        for e in cfg.ensembles
        for m in e.members
        if not cfg.resolve(m.model).is_file()
    ]


def _ensure_models(cfg: GatewayConfig) -> None:
    """Build the model zoo on first use when the config's member files live there."""
    missing = _missing_models(cfg)
    if not missing:
        return
    from ensemble.models.zoo import ensure_zoo

    zoo = cfg.zoo_dir()
    if cfg.model_zoo.build_if_missing and all(p.parent == zoo for p in missing):
        _progress(f"model files missing; building the model zoo in {zoo} (takes about 15 s)")
        start = time.perf_counter()
        ensure_zoo(zoo, progress=_progress)
        _progress(f"model zoo ready in {time.perf_counter() - start:.1f} s")


def _announcer(kind: str, models: list[str]) -> Callable[[object], None]:
    """Prints the one line on stdout that says the server listens (scripts and tests wait for
    it): ``ensemble gateway ready: http=HOST:PORT grpc=HOST:PORT models=a,b``."""

    def announce(addr: object) -> None:
        from ensemble.server import Addresses

        assert isinstance(addr, Addresses)
        print(
            f"ensemble {kind} ready: http={addr.host}:{addr.http_port} "
            f"grpc={addr.host}:{addr.grpc_port} models={','.join(models)}",
            flush=True,
        )

    return announce


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    host = args.host or cfg.server.host
    http_port = cfg.server.http_port if args.http_port is None else args.http_port
    grpc_port = cfg.server.grpc_port if args.grpc_port is None else args.grpc_port

    announce = _announcer("gateway", cfg.model_names())
    ray = None
    try:
        _ensure_models(cfg)
        if args.ray_address:
            from ensemble.replicas.ray_serve import serve_on_cluster

            server = cfg.server.model_copy(
                update={"host": host, "http_port": http_port, "grpc_port": grpc_port}
            )
            cfg = cfg.model_copy(update={"server": server})
            return serve_on_cluster(cfg, args.ray_address, _progress, announce)
        if cfg.uses_ray():
            from ensemble.replicas.ray_serve import RayRuntime

            # Before the event loop's signal handlers: ray.init installs its own.
            ray = RayRuntime.start_local(cfg, _progress)
        import uvloop

        from ensemble.server import Gateway, run_gateway

        def make() -> Gateway:
            return Gateway.from_config(cfg, _progress, ray)

        return uvloop.run(run_gateway(make, host, http_port, grpc_port, announce))
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot serve {args.config}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray is not None:
            _progress("stopping Ray")
            ray.shutdown()


def _server_settings(args: argparse.Namespace) -> ServerConfig | None:
    """The replica's server settings from its flags; None (errors printed) when invalid."""
    given = {
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "executor_threads": args.executor_threads,
        "max_batch_size": args.max_batch_size,
        "max_request_bytes": args.max_request_bytes,
        "batching": not args.no_batching,
        "batch_max_rows": args.batch_max_rows,
        "drain_timeout_s": args.drain_timeout_s,
    }
    try:
        given["tls"] = _tls_settings(args)
    except ValueError as exc:
        print(f"ensemble replica: {exc}", file=sys.stderr)
        return None
    try:
        return ServerConfig.model_validate(given)
    except ValidationError as exc:
        for error in exc.errors():
            flag = "--" + str(error["loc"][0]).replace("_", "-")
            print(f"ensemble replica: {flag}: {error['msg']}", file=sys.stderr)
        return None


_TLS_FLAGS = {
    "cert_file": "--tls-cert",
    "key_file": "--tls-key",
    "client_ca_file": "--tls-client-ca",
}


def _tls_settings(args: argparse.Namespace) -> TlsConfig | None:
    """The replica's TLS settings from its flags (None: plain text); raises ValueError naming
    the flag when the flags or the files they name are wrong."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    try:
        load_tls_files(cert, key, ca)
    except TlsFileError as exc:
        raise ValueError(f"{_TLS_FLAGS[exc.field]}: {exc.message}") from None
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=ca)


def _sha256_arg(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError("must be 64 hex digits (a SHA-256 digest)")
    return text.lower()


def cmd_replica(args: argparse.Namespace) -> int:
    server = _server_settings(args)
    name = args.name or args.model.stem
    if not NAME_PATTERN.fullmatch(name):
        print(
            f"ensemble replica: model name {name!r} must match {NAME_PATTERN.pattern} "
            "(set one with --name)",
            file=sys.stderr,
        )
        return 2
    if server is None:
        return 2

    announce = _announcer("replica", [name])

    try:
        import uvloop

        from ensemble.repository import Repository
        from ensemble.server import Gateway, run_gateway

        def make() -> Gateway:
            _progress(f"loading {args.model} as model {name}")
            card = args.card or card_path_for(args.model)
            if args.sha256 is None and not card.is_file():
                _progress(f"{args.model} has no card and no --sha256: serving it unverified")
            return Gateway(
                server,
                lambda engine: Repository.single_model(
                    args.model, name, engine, args.card, args.sha256
                ),
            )

        return uvloop.run(
            run_gateway(make, server.host, server.http_port, server.grpc_port, announce)
        )
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot serve {args.model}: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY if isinstance(exc, ModelIntegrityError) else 1


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    refused = _digest_errors(args.config, cfg)
    if refused:
        for line in refused:
            print(line, file=sys.stderr)
        print(f"{args.config}: invalid config ({len(refused)} error(s))", file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(f"  tiers: {', '.join(cfg.tiers)}")
    for ens in cfg.ensembles:
        members = ", ".join(
            f"{m.name}@{'/'.join(_placement_summary(p) for p in m.placement)}" for m in ens.members
        )
        print(f"  ensemble {ens.name} (profile {ens.policy}): {members}")
    for name in sorted({*cfg.policies, "default"}):
        profile = cfg.profile(name)
        fallback = f" fallback={profile.fallback}" if profile.fallback else ""
        print(
            f"  profile {name}: selection={profile.selection.name} "
            f"aggregation={profile.aggregation.name} routing={profile.routing.name} "
            f"hedging={profile.hedging.name} retry={profile.retry.name} "
            f"on_violation={profile.on_violation}{fallback}"
        )
    print(f"  outlier detection: {cfg.outlier_detection.name}")
    if cfg.autoscaling is not None:
        scaling = cfg.autoscaling
        print(
            f"  autoscaling: {scaling.policy.name} every {scaling.interval_s:g} s "
            f"(window {scaling.window_s:g} s)"
        )
    missing = _missing_models(cfg)
    if missing:
        print(f"  note: {len(missing)} model file(s) not built yet; `ensemble serve` builds them")
    return 0


def _digest_errors(path: Path, cfg: GatewayConfig) -> list[str]:
    """Model files that `serve` would refuse for their SHA-256, as config errors."""
    from ensemble.config_errors import format_errors, line_index
    from ensemble.model_checks import digest_errors

    problems = digest_errors(cfg)
    if not problems:
        return []
    return format_errors(str(path), problems, line_index(path.read_text(encoding="utf-8")))


def _placement_summary(place: Placement) -> str:
    if place.remote:
        return f"{place.tier}({place.backend} x{len(place.endpoints or ())})"
    low, high = place.replicas.min, place.replicas.max
    count = f"x{low}" if low == high else f"x{low}-{high}"
    if place.backend in ("ray", "process"):
        return f"{place.tier}({place.backend} {count})"
    return place.tier if low == high == 1 else f"{place.tier}({count})"


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date; run `ensemble schema`", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from ensemble.models.zoo import build_zoo

    start = time.perf_counter()
    manifest = build_zoo(args.out, seed=args.seed, progress=_progress)
    print(
        f"built {len(manifest.members)} members in {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ensemble.profiler import QUICK, ProfileSettings

    base = QUICK if args.quick else ProfileSettings()
    settings = ProfileSettings(
        requests=base.requests if args.requests is None else args.requests,
        concurrency=base.concurrency if args.concurrency is None else args.concurrency,
        batch=args.batch,
        warmup=base.warmup,
        max_seconds=base.max_seconds if args.max_seconds is None else args.max_seconds,
        all_tiers=args.all_tiers,
    )
    for flag, value in (
        ("--requests", settings.requests),
        ("--concurrency", settings.concurrency),
        ("--batch", settings.batch),
    ):
        if value < 1:
            print(f"ensemble profile: {flag} must be at least 1", file=sys.stderr)
            return 2
    if not settings.max_seconds > 0:
        print("ensemble profile: --max-seconds must be positive", file=sys.stderr)
        return 2
    cfg = _load(args.config)
    if cfg is None:
        return 2
    ray = None
    try:
        import asyncio

        from ensemble.profiler import format_table, profile_members, write_outputs

        _ensure_models(cfg)
        if cfg.uses_ray():
            from ensemble.replicas.ray_serve import RayRuntime

            ray = RayRuntime.start_local(cfg, _progress)
        cells = sum(len(m.placement) for e in cfg.ensembles for m in e.members)
        _progress(
            f"profiling {cells} member placement(s): {settings.requests} calls each at "
            f"concurrency {settings.concurrency}, batch {settings.batch} "
            f"(at most {settings.max_seconds:g} s per placement)"
        )
        start = time.perf_counter()
        rows = asyncio.run(profile_members(cfg, settings, _progress, ray))
        paths = write_outputs(rows, args.out, args.config.name)
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot profile {args.config}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray is not None:
            ray.shutdown()
    print(format_table(rows), end="")
    print(
        "accuracy: test split (test.npz) unless marked * (member card); latency/calls/s: member "
        "calls through the gateway's replicas, emulated link included; cost per 1,000 calls"
    )
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble",
        description=(
            "Elastic ensemble serving gateway: answers Open Inference Protocol (KServe v2) "
            "requests over HTTP and gRPC from an ensemble of ONNX models on edge and cloud tiers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="Logging level for the gateway (default: INFO)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    replica = sub.add_parser(
        "replica",
        help="Serve one ONNX model over OIP (HTTP + gRPC): the light server of an edge device.",
        description=(
            "Serve one ONNX model over the Open Inference Protocol, REST and gRPC, with the "
            "gateway's own frontends: health (/v2/health/live, /v2/health/ready, "
            "/v2/models/NAME/ready), metadata, Triton's model config, /metrics, the binary "
            "tensor extension and OIP errors (400 / INVALID_ARGUMENT for bad input). No "
            "ensemble, no config file, no Ray: a gateway reaches it with backend oip-http or "
            "oip-grpc. The member card beside the model (FILE.card.json) is read when present, "
            "and the file must match its SHA-256 (and --sha256's) or it is not served. "
            "Prints one 'ensemble replica ready: http=HOST:PORT grpc=HOST:PORT models=NAME' "
            "line on stdout once both frontends listen; SIGTERM/SIGINT drain in-flight "
            "requests, then exit 0. Exit 2 on invalid options, 3 when the model file fails its "
            "digest check, 1 when it cannot start otherwise."
        ),
        epilog=(
            "example: ensemble replica models/digits/logreg.onnx --http-port 9000 --grpc-port 9001"
        ),
    )
    replica.add_argument("model", type=Path, help="The ONNX file to serve.")
    replica.add_argument(
        "--name", help="Model name clients use (default: the file name without .onnx)."
    )
    replica.add_argument(
        "--card",
        type=Path,
        metavar="PATH",
        help="Member card JSON (default: the model's FILE.card.json beside FILE.onnx).",
    )
    replica.add_argument(
        "--sha256",
        type=_sha256_arg,
        metavar="HEX",
        help="SHA-256 the model file must have; it is refused (exit 1) otherwise. The card's "
        "digest is checked too when there is a card; with neither, the file is served "
        "unverified.",
    )
    replica.add_argument(
        "--host", default="127.0.0.1", help="Bind address (default: 127.0.0.1; 0.0.0.0: all)."
    )
    replica.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        default=9000,
        help="OIP REST port (default 9000; 0 = any free).",
    )
    replica.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        default=9001,
        help="OIP gRPC port (default 9001; 0 = any free).",
    )
    replica.add_argument(
        "--executor-threads",
        type=int,
        metavar="N",
        default=2,
        help="Threads running onnxruntime, one call each (default 2; about one per core).",
    )
    replica.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        default=1024,
        help="Largest accepted batch dimension (default 1024).",
    )
    replica.add_argument(
        "--max-request-bytes",
        type=int,
        metavar="N",
        default=64 * 1024 * 1024,
        help="Largest accepted request body in bytes, REST and gRPC (default 64 MiB).",
    )
    replica.add_argument(
        "--no-batching",
        action="store_true",
        help="Run concurrent calls one by one instead of combining them into one onnxruntime "
        "call (combining happens only when calls queue up).",
    )
    replica.add_argument(
        "--batch-max-rows",
        type=int,
        metavar="N",
        default=256,
        help="Most rows one combined onnxruntime call may hold (default 256).",
    )
    replica.add_argument(
        "--drain-timeout-s",
        type=float,
        metavar="S",
        default=30.0,
        help="On SIGTERM, how long in-flight requests may take to finish (default 30).",
    )
    replica.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PATH",
        help="PEM certificate chain: serve HTTPS and gRPC over TLS (with --tls-key).",
    )
    replica.add_argument(
        "--tls-key", type=Path, metavar="PATH", help="PEM private key of --tls-cert (unencrypted)."
    )
    replica.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PATH",
        help="PEM CA certificates: clients must present a certificate signed by one (mutual TLS).",
    )
    replica.set_defaults(func=cmd_replica)

    validate = sub.add_parser(
        "validate",
        help="Check a config; print every error with its YAML path.",
        description="Validate a config file, reading the model files it names: the members "
        "of an ensemble must take the same inputs, and each file must match its card's or "
        "`sha256` pin's digest. Exit 0 and print a summary when it is good; print every error "
        "as FILE:LINE:COL: yaml.path: message and exit 1 otherwise.",
    )
    validate.add_argument("config", type=Path, help="Config YAML to check.")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser(
        "schema",
        help="Write the config's JSON schema.",
        description="Generate the JSON schema of the config file (for editors and CI).",
    )
    schema.add_argument("--out", type=Path, default=SCHEMA_PATH, help="Output file.")
    schema.add_argument("--check", action="store_true", help="Exit 1 if --out is out of date.")
    schema.set_defaults(func=cmd_schema)

    models = sub.add_parser("models", help="Model zoo commands.")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    build = models_sub.add_parser(
        "build",
        help="Train the digits model zoo and export ONNX files and member cards.",
        description="Train classifiers on scikit-learn's bundled digits data (no downloads), "
        "export them to ONNX with int8 variants of the neural ones, and write a card per member "
        "plus the labelled test split (test.npz). Takes about 15 s on 2 cores.",
    )
    build.add_argument("--out", type=Path, default=Path("models/digits"), help="Output directory.")
    build.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    build.set_defaults(func=cmd_models_build)

    profile = sub.add_parser(
        "profile",
        help="Measure every member on every tier: accuracy, latency, throughput, memory, cost.",
        description=(
            "Profile the config's members, one row per member x tier it is placed on: accuracy "
            "on the model zoo's test split (test.npz; else the member card's test accuracy, "
            "marked *), latency p50/p99 and throughput of member calls, memory, and cost per "
            "1,000 calls. Calls go through the same replica objects the gateway routes to, "
            "so a tier's emulated link (when the config emulates it), and the oip-http/oip-grpc "
            "clients of remote placements, are included; the gateway's HTTP/gRPC frontend is "
            "not. Memory is the process's resident-set growth while loading the member "
            "(in-process placements only) beside the ONNX file size. Cost per 1,000 calls is "
            "1,000 x the tier's cost_per_request plus its cost_per_replica_hour x replicas "
            "amortised at the measured throughput. Prints the table on stdout (progress on "
            "stderr) and writes profile.csv, profile.md and profile.png (accuracy against p50 "
            "latency, Pareto front marked) into --out. Exit 0; 2 on an invalid config or "
            "option; 1 when a member cannot be loaded."
        ),
        epilog="example: ensemble profile configs/default.yaml --quick --out profile",
    )
    profile.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Config YAML (default: {DEFAULT_CONFIG}).",
    )
    profile.add_argument(
        "--out", type=Path, default=Path("profile"), help="Output directory (default: profile)."
    )
    profile.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="Timed calls per member x tier (default 1000; 40 with --quick).",
    )
    profile.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help="Calls in flight at once per member x tier (default 4; 2 with --quick).",
    )
    profile.add_argument(
        "--batch", type=int, metavar="B", default=1, help="Rows per call (default 1)."
    )
    profile.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="Stop timing a member x tier after this long (default 20; 5 with --quick).",
    )
    profile.add_argument(
        "--quick",
        action="store_true",
        help="Fewer calls (40 per member x tier, a few seconds in all): a smoke run.",
    )
    profile.add_argument(
        "--all-tiers",
        action="store_true",
        help="Also measure each member in-process on the configured tiers it is not placed "
        "on (rows marked what-if).",
    )
    profile.set_defaults(func=cmd_profile)

    from loadtest.cli import register as register_loadtest

    register_loadtest(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="ensemble: %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per remote call otherwise
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
