"""`ensemble rules`: Prometheus recording rules and burn-rate alerts for your objectives."""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ensemble.cli.common import Subparsers
from ensemble.metrics.rules import Objectives, render

DEFAULTS = Objectives()


def _number(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def cmd_rules(args: argparse.Namespace) -> int:
    objectives = Objectives(
        availability=args.availability,
        latency=args.latency,
        latency_bound_s=args.latency_bound,
        whole_answers=args.whole_answers,
        admitted=args.admitted,
        spend_per_hour=args.spend_per_hour,
        ejections_per_hour=args.ejections_per_hour,
    )
    problems = objectives.problems()
    if problems:
        for problem in problems:
            print(f"ensemble rules: {problem}", file=sys.stderr)
        return 2
    text = render(objectives)
    if args.check is not None:
        current = args.check.read_text() if args.check.is_file() else ""
        if current != text:
            print(f"{args.check} differs from these objectives' rules", file=sys.stderr)
            return 1
        print(f"{args.check} is current")
        return 0
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _percent(parser: argparse.ArgumentParser, flag: str, default: Decimal, text: str) -> None:
    parser.add_argument(flag, type=_number, default=default, metavar="PERCENT", help=text)


def register(sub: Subparsers) -> None:
    """Add `ensemble rules`."""
    parser = sub.add_parser(
        "rules",
        help="Write Prometheus recording rules and burn-rate alerts for your objectives.",
        description="Render the gateway's Prometheus rules (recording rules for its SLIs, "
        "multi-window burn-rate alerts that page on a fast burn and open a ticket on a slow "
        "one) for the objectives given; the defaults give deploy/prometheus/"
        "ensemble-rules.yml. Percentages are of requests (of answers for --whole-answers), "
        "over a 30-day period. Prints to stdout unless --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _percent(
        parser,
        "--availability",
        DEFAULTS.availability,
        "requests answered without a server-side failure (5xx)",
    )
    _percent(parser, "--latency", DEFAULTS.latency, "requests answered within --latency-bound")
    parser.add_argument(
        "--latency-bound",
        type=float,
        default=DEFAULTS.latency_bound_s,
        metavar="SECONDS",
        help="the latency objective's bound: a bucket bound of "
        "ensemble_request_duration_seconds (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, ...)",
    )
    _percent(
        parser,
        "--whole-answers",
        DEFAULTS.whole_answers,
        "an ensemble's answers not degraded (partial, from the fallback, short of their contract)",
    )
    _percent(
        parser, "--admitted", DEFAULTS.admitted, "requests not shed by admission control (429)"
    )
    parser.add_argument(
        "--spend-per-hour",
        type=_number,
        default=DEFAULTS.spend_per_hour,
        metavar="AMOUNT",
        help="spend budget an hour, in the config's currency (replica time and call prices)",
    )
    parser.add_argument(
        "--ejections-per-hour",
        type=int,
        default=DEFAULTS.ejections_per_hour,
        metavar="N",
        help="replica ejections by outlier detection an hour still acceptable",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, metavar="FILE", help="write the rules to FILE")
    out.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="exit 1 if FILE is not what these objectives give (for CI)",
    )
    parser.set_defaults(func=cmd_rules)
