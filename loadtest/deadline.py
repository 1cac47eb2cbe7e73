"""Live estimates under a tight deadline and a changing link: deadlines met, accuracy, cost.

`python -m loadtest.deadline` serves `loadtest/configs/deadline.yaml` once and measures two
things through the load-test harness, each against the card-based choice in the same run.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest import straggler
from loadtest.deadline_report import Reading, goals, link_row, render_markdown, summary
from loadtest.experiment import (
    CONFIGS,
    ROOT,
    Driver,
    Report,
    Run,
    add_common,
    goals_doc,
    new_parser,
    progress,
    run_tokens,
    settings_doc,
    split_list,
    write_report,
)
from loadtest.measure import Samples, drive_watched, harness_report, total

if TYPE_CHECKING:
    from loadtest.scenario import Scenario

NAME = "deadline"
DEFAULT_CONFIG = CONFIGS / "deadline.yaml"

DESCRIPTION = """\
Live estimates under a tight deadline and a changing link.

Serves CONFIG (default loadtest/configs/deadline.yaml: logreg on the edge, svm and mlp_large in
the cloud behind an emulated 20 ms link, a 40 ms round trip) once, on free ports, and measures
through the load-test harness (open-loop Poisson, HTTP binary tensors, one generator process):

  1. Tight deadline: every profile of --profiles in turn (default live, card, all, edge_only:
     slo_greedy on live estimates, the same on the cards' offline latency, every member, the
     edge member alone), each request carrying `timeout` --tight-ms (default 15 ms): the share
     answered within the deadline (measured by the client, from the intended send time),
     accuracy, cost per 1,000 requests, calls per tier. Same seed for every profile: the same
     arrivals and samples.
  2. Changing link: for each of --link-profiles (default live, card) a run of --link-duration
     seconds with `timeout` --link-deadline-ms (default 60 ms), while the cloud's round trip goes
     --near-ms -> --far-ms -> --near-ms (default 10 -> 150 -> 10 ms, a third of the run each,
     through the links admin API), the same arrivals and samples for each: per third, deadlines
     met, accuracy and calls to the cloud per request (read from /metrics every 0.25 s); the
     time to adapt (from a change, seen on /metrics, to the last call to the cloud after the
     link went far, or the first after it came near again); the last deadline missed after
     each change.

Goals: live meets >= 99% of deadlines in both with accuracy at least edge_only's in 1 and
recovering in the last third of 2 (at least the middle third's). Writes OUT/report.json,
OUT/report.md and each run's harness report under OUT/profiles/ and OUT/link/. The defaults
take about 3 minutes; --quick about 1 minute. Needs nothing but the zoo (built on first use).
Exit 0 when the runs completed (whatever the goals say), 2 when they could not run.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    config: Path = DEFAULT_CONFIG
    out: Path | None = None
    rps: float = 100.0
    duration_s: float = 20.0
    warmup_s: float = 3.0
    tight_ms: float = 15.0
    profiles: tuple[str, ...] = ("live", "card", "all", "edge_only")
    link_profiles: tuple[str, ...] = ("live", "card")
    link_duration_s: float = 30.0
    link_deadline_ms: float = 60.0
    near_ms: float = 10.0
    far_ms: float = 150.0
    seed: int = 0
    quiet: bool = False


def say(line: str) -> None:
    progress(NAME, line)


def tight_runs(settings: Settings, target: straggler.Target) -> list[dict[str, Any]]:
    """Part 1: each profile measured alone with the tight deadline (the straggler driver's
    profile run: the SLO is the deadline)."""
    import uvloop

    runs = straggler.Settings(
        config=settings.config,
        rps=settings.rps,
        duration_s=settings.duration_s,
        warmup_s=settings.warmup_s,
        slo_ms=settings.tight_ms,
        deadline_ms=settings.tight_ms,
        feedback_share=0.1,
        seed=settings.seed,
        quiet=settings.quiet,
    )
    rows: list[dict[str, Any]] = []

    async def all_profiles() -> None:
        for i, name in enumerate(settings.profiles):
            row = await straggler.run_profile(runs, name, i, target, NAME)
            rows.append({k: row[k] for k in TIGHT_KEYS})

    uvloop.run(all_profiles())
    return rows


TIGHT_KEYS = (
    "profile",
    "sent",
    "answered",
    "errors",
    "within_slo",
    "slo_attainment",
    "accuracy",
    "latency_ms",
    "cost_per_1k",
    "member_calls",
    "calls_per_request",
    "gateway_cores",
    "other_cores",
)


def link_scenario(settings: Settings, target: straggler.Target, profile: str) -> Scenario:
    """Part 2's scenario for one profile: the cloud link near, far, near again."""
    from loadtest.scenario import parse_scenario

    third = settings.link_duration_s / 3
    doc = {
        "name": f"deadline-link-{profile}",
        "description": f"Profile {profile} while the cloud's round trip changes.",
        "target": {"url": target.url},
        "protocol": "http_binary",
        "model": target.prices.model,
        "request": {"data": str(target.data), "timeout_s": 2.0},
        "load": {"shape": "poisson", "rps": settings.rps, "duration_s": settings.link_duration_s},
        "mix": [
            {
                "name": profile,
                "parameters": {
                    "policy": profile,
                    "timeout": round(settings.link_deadline_ms * 1000),
                },
            }
        ],
        "faults": [
            link_event(0.0, settings.link_duration_s, settings.near_ms),
            link_event(third, third, settings.far_ms),
        ],
        "seed": settings.seed,
    }
    return parse_scenario(doc, source=f"<deadline link {profile}>", base_dir=ROOT)


def link_event(at_s: float, duration_s: float, round_trip_ms: float) -> dict[str, Any]:
    """The cloud link's one-way delay set for ``duration_s`` (then put back as it was)."""
    params = {"tier": "cloud", "duration_s": duration_s, "delay_ms": round_trip_ms / 2}
    return {"at_s": at_s, "name": "link", "params": params}


SAMPLE_EVERY_S = 0.25
"""How often the link run reads the gateway's /metrics (the time-to-adapt's resolution)."""


def reading(at: float, samples: Samples) -> Reading:
    """The cloud link's delay and the calls to the cloud, from one read of /metrics."""
    return Reading(
        at,
        total(samples, "ensemble_link_delay_seconds", tier="cloud"),
        total(samples, "ensemble_member_calls_total", tier="cloud"),
    )


def link_runs(settings: Settings, target: straggler.Target) -> dict[str, Any]:
    """Part 2: each profile's run while the link changes, with /metrics read alongside."""
    import uvloop

    rows: dict[str, Any] = {}
    third = settings.link_duration_s / 3
    for profile in settings.link_profiles:
        sc = link_scenario(settings, target, profile)
        say(
            f"{profile}: changing link, {settings.link_duration_s:g} s at {settings.rps:g} "
            f"req/s, round trip {settings.near_ms:g} -> {settings.far_ms:g} -> "
            f"{settings.near_ms:g} ms"
        )
        started = dt.datetime.now().astimezone()

        watched = drive_watched(
            sc, target.url, target.data, settings.quiet, SAMPLE_EVERY_S, reading
        )
        result, marks, readings = uvloop.run(watched)
        source = f"<deadline link {profile}>"
        out = target.out / "link" / profile
        harness_report(sc, result, out, url=target.url, source=source, started=started, marks=marks)
        rows[profile] = link_row(result, settings.link_deadline_ms, (third, 2 * third), readings)
    return {
        "deadline_ms": settings.link_deadline_ms,
        "changes_s": [third, 2 * third],
        "profiles": rows,
    }


def run(settings: Settings, command: str = "") -> Report:
    """Serve the config, run both parts, write report.json and report.md; the report."""
    from ensemble.auth import ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV
    from ensemble.config import load_config
    from ensemble.models import ensure_zoo
    from loadtest.gateway import start_gateway, stop_gateway
    from loadtest.straggler_report import Prices

    cfg = load_config(settings.config)
    unknown = [p for p in {*settings.profiles, *settings.link_profiles} if p not in cfg.policies]
    if unknown:
        raise ValueError(f"profile(s) not in {settings.config}: {', '.join(sorted(unknown))}")
    this = Run(NAME, settings.out, command)
    ensure_zoo(cfg.zoo_dir(), progress=say)
    # The link changes go through the admin API and labels through feedback: tokens for the run.
    with run_tokens(ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV):
        say(f"starting the gateway on {settings.config} (log: {this.out / 'gateway.log'})")
        gw = start_gateway(settings.config, this.out / "gateway.log", 120)
        prices = Prices.of(settings.config)
        zoo_test = cfg.zoo_dir() / "test.npz"
        target = straggler.Target(gw.url, gw.proc.pid, zoo_test, prices, this.out)
        try:
            tight = tight_runs(settings, target)
            link = link_runs(settings, target)
        finally:
            exit_code = stop_gateway(gw, 60)
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out)),
        "gateway_exit_code": exit_code,
        "tight": tight,
        "link": link,
        "goals": goals_doc(goals(tight, link)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(
        parser,
        NAME,
        quick="A short run: 1 s warm-up + 5 s per profile, 12 s link runs (about 1 minute).",
    )
    add = parser.add_argument
    add("--rps", type=float, default=100.0, help="Mean request rate (default 100).")
    add("--duration", type=float, help="Measured seconds per profile in 1 (default 20).")
    add("--warmup", type=float, help="Warm-up seconds per profile in 1 (default 3).")
    add("--tight-ms", type=float, default=15.0, help="Deadline in 1, ms (default 15).")
    add("--profiles", help="Profiles of 1, comma-separated (default live,card,all,edge_only).")
    add("--link-profiles", help="Profiles mixed in 2 (default live,card).")
    add("--link-duration", type=float, help="Seconds of the link run (default 30).")
    add("--link-deadline-ms", type=float, default=60.0, help="Deadline in 2, ms (default 60).")
    add("--near-ms", type=float, default=10.0, help="Cloud round trip, near (default 10 ms).")
    add("--far-ms", type=float, default=150.0, help="Cloud round trip, far (default 150 ms).")
    add(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Gateway config (default {DEFAULT_CONFIG.relative_to(ROOT)}).",
    )
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 20.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    link_s = (
        args.link_duration if args.link_duration is not None else (12.0 if args.quick else 30.0)
    )
    positive = (duration, args.rps, args.tight_ms, link_s, args.link_deadline_ms, args.far_ms)
    if min(positive) <= 0 or warmup < 0 or args.near_ms < 0:
        parser.error("durations, --rps, deadlines and round trips must be positive")
    defaults = Settings()
    return Settings(
        config=args.config.resolve(),
        out=args.out,
        rps=args.rps,
        duration_s=duration,
        warmup_s=warmup,
        tight_ms=args.tight_ms,
        profiles=split_list(args.profiles) or defaults.profiles,
        link_profiles=split_list(args.link_profiles) or defaults.link_profiles,
        link_duration_s=link_s,
        link_deadline_ms=args.link_deadline_ms,
        near_ms=args.near_ms,
        far_ms=args.far_ms,
        seed=args.seed,
        quiet=args.quiet,
    )


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
