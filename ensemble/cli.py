"""The `ensemble` command: serve, validate, schema, models build, loadtest."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ensemble import __version__
from ensemble.config import GatewayConfig, json_schema, load_config
from ensemble.errors import ConfigError, EnsembleError

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


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    host = args.host or cfg.server.host
    http_port = cfg.server.http_port if args.http_port is None else args.http_port
    grpc_port = cfg.server.grpc_port if args.grpc_port is None else args.grpc_port

    def announce(addr: object) -> None:
        from ensemble.server import Addresses

        assert isinstance(addr, Addresses)
        print(
            f"ensemble gateway ready: http={addr.host}:{addr.http_port} "
            f"grpc={addr.host}:{addr.grpc_port} models={','.join(cfg.model_names())}",
            flush=True,
        )

    try:
        _ensure_models(cfg)
        import uvloop

        from ensemble.server import run_gateway

        return uvloop.run(run_gateway(cfg, host, http_port, grpc_port, announce, _progress))
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot serve {args.config}: {exc}", file=sys.stderr)
        return 1


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    print(f"{args.config}: OK")
    print(f"  tiers: {', '.join(cfg.tiers)}")
    for ens in cfg.ensembles:
        members = ", ".join(
            f"{m.name}@{'/'.join(p.tier for p in m.placement)}" for m in ens.members
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
    missing = _missing_models(cfg)
    if missing:
        print(f"  note: {len(missing)} model file(s) not built yet; `ensemble serve` builds them")
    return 0


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
    serve.add_argument("--http-port", type=int, help="OIP REST port (0 = any free port).")
    serve.add_argument("--grpc-port", type=int, help="OIP gRPC port (0 = any free port).")
    serve.set_defaults(func=cmd_serve)

    validate = sub.add_parser(
        "validate",
        help="Check a config; print every error with its YAML path.",
        description="Validate a config file. Exit 0 and print a summary when it is good; "
        "print every error as FILE:LINE:COL: yaml.path: message and exit 1 otherwise.",
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

    from loadtest.cli import register as register_loadtest

    register_loadtest(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="ensemble: %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
