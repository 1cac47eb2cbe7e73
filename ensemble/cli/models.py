"""`ensemble models build`: the digits model zoo trained and exported."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ensemble.cli.common import Subparsers, progress


def cmd_models_build(args: argparse.Namespace) -> int:
    from ensemble.models.zoo import build_zoo

    start = time.perf_counter()
    manifest = build_zoo(args.out, seed=args.seed, progress=progress)
    print(
        f"built {len(manifest.members)} members in {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def register(sub: Subparsers) -> None:
    """Add `ensemble models` and its `build` subcommand."""
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
