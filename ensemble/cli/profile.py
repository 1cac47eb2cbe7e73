"""`ensemble profile`: every member measured on every tier it is placed on."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ensemble.cli.common import DEFAULT_CONFIG, Subparsers, ensure_models, progress, read_config
from ensemble.errors import EnsembleError


def cmd_profile(args: argparse.Namespace) -> int:
    from ensemble.measure.settings import QUICK, ProfileSettings

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
    cfg = read_config(args.config)
    if cfg is None:
        return 2
    ray = None
    try:
        import asyncio

        from ensemble.measure.members import profile_members
        from ensemble.measure.report import format_splits, format_table, write_outputs

        ensure_models(cfg)
        if cfg.uses_ray():
            from ensemble.control.ray_runtime import RayRuntime

            ray = RayRuntime.start_local(cfg, progress)
        cells = sum(len(m.placement) for e in cfg.ensembles for m in e.members)
        progress(
            f"profiling {cells} member placement(s): {settings.requests} calls each at "
            f"concurrency {settings.concurrency}, batch {settings.batch} "
            f"(at most {settings.max_seconds:g} s per placement)"
        )
        start = time.perf_counter()
        rows = asyncio.run(profile_members(cfg, settings, progress, ray))
        paths = write_outputs(rows, args.out, args.config.name)
    except (EnsembleError, OSError) as exc:
        print(f"ensemble: cannot profile {args.config}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ray is not None:
            ray.shutdown()
    print(format_table(rows), end="")
    splits = format_splits(rows)
    if splits:
        print(
            "\nsplit members (head on the first tier, tail on the second; one-row call, "
            "the link as configured):"
        )
        print(splits, end="")
    print(
        "accuracy: test split (test.npz) unless marked * (member card); latency/calls/s: member "
        "calls through the gateway's replicas, emulated link included; cost per 1,000 calls"
    )
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s")
    return 0


def register(sub: Subparsers) -> None:
    """Add `ensemble profile`."""
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
