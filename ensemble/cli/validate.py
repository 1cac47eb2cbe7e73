"""`ensemble validate` and `ensemble schema`: a config checked, and the config's JSON schema."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ensemble.cli.common import Subparsers, missing_models, read_config
from ensemble.config import GatewayConfig, MemberConfig, Placement, json_schema

SCHEMA_PATH = Path("configs/schema.json")


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = read_config(args.config)
    if cfg is None:
        return 1
    refused = _digest_errors(args.config, cfg) or _card_errors(args.config, cfg)
    if refused:
        for line in refused:
            print(line, file=sys.stderr)
        print(f"{args.config}: invalid config ({len(refused)} error(s))", file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(f"  tiers: {', '.join(cfg.tiers)}")
    for ens in cfg.ensembles:
        members = ", ".join(
            f"{m.name}@{'/'.join(_placement_summary(p) for p in m.placement)}{_versions(m)}"
            for m in ens.members
        )
        drift = (
            f"; drift window {ens.drift.window} rows, threshold {ens.drift.threshold:g}"
            if ens.drift.enabled
            else "; drift off"
        )
        print(f"  ensemble {ens.name} (profile {ens.policy}): {members}{drift}")
    for name in sorted({*cfg.policies, "default"}):
        profile = cfg.profile(name)
        extras = f" fallback={profile.fallback}" if profile.fallback else ""
        doubt = profile.uncertainty
        if doubt is not None:
            limits = ",".join(
                f"{key}>{value:g}"
                for key, value in doubt.model_dump(exclude={"escalate"}).items()
                if value is not None
            )
            extras += f" uncertain={limits or 'never'}{' (escalated)' if doubt.escalate else ''}"
        print(
            f"  profile {name}: selection={profile.selection.name} "
            f"aggregation={profile.aggregation.name} routing={profile.routing.name} "
            f"hedging={profile.hedging.name} retry={profile.retry.name} "
            f"on_violation={profile.on_violation}{extras}"
        )
    print(f"  outlier detection: {cfg.outlier_detection.name}")
    if cfg.autoscaling is not None:
        scaling = cfg.autoscaling
        print(
            f"  autoscaling: {scaling.policy.name} every {scaling.interval_s:g} s "
            f"(window {scaling.window_s:g} s)"
        )
    missing = missing_models(cfg)
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


def _card_errors(path: Path, cfg: GatewayConfig) -> list[str]:
    """Zoo cards whose claimed accuracy their model does not score (what `serve` would refuse
    after the digests), as config errors at the member's `card` or `model`."""
    from ensemble.cards import card_path, check_card, member_card
    from ensemble.config_errors import LocatedError, format_errors, line_index
    from ensemble.errors import EnsembleError
    from ensemble.models.profiling import profiling_session

    problems: list[LocatedError] = []
    for loc, member in cfg.member_specs():
        model = cfg.resolve(member.model)
        if not model.is_file():
            continue  # built by `serve`, or said missing by it
        try:
            card = member_card(cfg, member)
            if card is not None:
                check_card(member.name, card, card_path(cfg, member), profiling_session(model))
        except EnsembleError as exc:
            problems.append(((*loc, "card" if member.card else "model"), exc.message))
    if not problems:
        return []
    return format_errors(str(path), problems, line_index(path.read_text(encoding="utf-8")))


def _versions(member: MemberConfig) -> str:
    """`` versions 1,2 (rollout of 2: canary 10%)`` for a member with several, `` split
    (latency)`` for a split one, else empty."""
    if not member.loaded:
        return " (unloaded)"
    if member.split is not None:
        return f" split ({member.split.policy.name})"
    if not member.versions:
        return ""
    text = f" versions {','.join(member.served_versions())}"
    rollout = member.rollout
    if rollout is not None:
        how = f"canary {rollout.weight:.0%}" if rollout.mode == "canary" else "shadow"
        text += f" (rollout of {rollout.version}: {how}{'' if rollout.auto else ', manual'})"
    return text


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


def register(sub: Subparsers) -> None:
    """Add `ensemble validate` and `ensemble schema`."""
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
