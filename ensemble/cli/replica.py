"""`ensemble replica`: one ONNX model served over OIP, the light server of an edge device."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from ensemble.cli.common import Subparsers, announcer, progress
from ensemble.config import NAME_PATTERN, ServerConfig, TlsConfig
from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.integrity import EXIT_INTEGRITY
from ensemble.models.card import card_path_for
from ensemble.tls import TlsFileError, load_tls_files


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
        "grpc_stack": args.grpc_stack,
    }
    if args.trace is not None:  # `server.tracing` of a gateway config
        given["tracing"] = {
            "enabled": True,
            "exporter": args.trace,
            "endpoint": args.trace_endpoint,
            "service_name": f"ensemble-replica {args.name or args.model.stem}",
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

    announce = announcer("replica", [name])

    try:
        import uvloop

        from ensemble.control.build import single_model
        from ensemble.server import Gateway, run_gateway

        def make() -> Gateway:
            progress(f"loading {args.model} as model {name}")
            card = args.card or card_path_for(args.model)
            if args.sha256 is None and not card.is_file():
                progress(f"{args.model} has no card and no --sha256: serving it unverified")
            return Gateway(
                server,
                lambda engine: single_model(args.model, name, engine, args.card, args.sha256),
            )

        return uvloop.run(
            run_gateway(make, server.host, server.http_port, server.grpc_port, announce)
        )
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot serve {args.model}: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY if isinstance(exc, ModelIntegrityError) else 1


def register(sub: Subparsers) -> None:
    """Add `ensemble replica`."""
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
    _add_server_flags(replica)
    _add_tls_flags(replica)
    _add_trace_flags(replica)
    replica.set_defaults(func=cmd_replica)


def _add_server_flags(replica: argparse.ArgumentParser) -> None:
    """The flags that stand for `server` settings of a gateway config (TLS apart)."""
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
        "--grpc-stack",
        choices=("grpcio", "uvicorn"),
        default="grpcio",
        help="What serves gRPC: grpcio (gRPC core, default) or uvicorn (uvicorn's HTTP/2, "
        "under half the CPU per call; unary calls; docs/performance.md#grpc-stacks).",
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


def _add_trace_flags(replica: argparse.ArgumentParser) -> None:
    """The flags that stand for `server.tracing` of a gateway config."""
    replica.add_argument(
        "--trace",
        choices=("otlp", "console"),
        help="Export OpenTelemetry spans (the `tracing` extra): a span per request, continuing "
        "its caller's `traceparent` (a gateway's call span); `otlp` to --trace-endpoint, "
        "`console` as JSON on stderr. Off by default.",
    )
    replica.add_argument(
        "--trace-endpoint",
        default="http://127.0.0.1:4318/v1/traces",
        metavar="URL",
        help="OTLP/HTTP endpoint of --trace otlp (default http://127.0.0.1:4318/v1/traces).",
    )


def _add_tls_flags(replica: argparse.ArgumentParser) -> None:
    """The flags that stand for `server.tls` of a gateway config."""
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
