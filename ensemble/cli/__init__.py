"""The `ensemble` command: serve, replica, validate, schema, models build, profile, rules, and the
commands other packages plug in (`ensemble.commands` entry points, e.g. loadtest)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from ensemble import __version__
from ensemble.cli import models, profile, replica, rules, serve, validate
from ensemble.cli.plugins import COMMANDS_GROUP, add_plugin_commands

__all__ = ["COMMANDS_GROUP", "add_plugin_commands", "build_parser", "main"]


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
    for module in (serve, replica, validate, models, profile, rules):
        module.register(sub)
    add_plugin_commands(sub)
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
