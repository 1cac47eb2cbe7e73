"""Policy profiles under a straggler replica: SLO attainment, accuracy, cost, tail, hedges.

`python -m loadtest.straggler` serves `loadtest/configs/straggler.yaml` once and runs one open-loop
scenario per policy profile through the load-test harness, sequentially on the same gateway.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from loadtest.measure import CpuReading, cores, delta, drive, harness_report, scrape, slo_attainment
from loadtest.straggler_report import (
    Prices,
    gateway_counts,
    goals,
    learned_weights,
    render_markdown,
    summary,
)

if TYPE_CHECKING:
    from loadtest.scenario import Scenario

NAME = "straggler"
DEFAULT_CONFIG = CONFIGS / "straggler.yaml"

DESCRIPTION = """\
Policy profiles under a straggler replica.

Serves CONFIG (default loadtest/configs/straggler.yaml: the seven digits members with two
replicas each, one replica of `forest` answering 10% of its calls 100 ms late) once, on free
ports, and runs every policy profile of the config in turn (or those given with --profiles):
a warm-up, then a measured open-loop Poisson run at --rps for --duration seconds through the
load-test harness (HTTP, binary tensors, one generator in this process). Every request carries
parameters {policy: PROFILE, timeout: DEADLINE}; the true label of every answer is posted to the
gateway's feedback API (with ENSEMBLE_FEEDBACK_TOKEN, or a token made for the run when it is
unset), so learning profiles (exp4, cocktail) learn during their warm-up and run.
Every measured run uses the same seed (same arrival times, same samples), so profiles are
compared on identical traffic. /metrics is scraped before and after each measured run for the
profile's member calls, hedges and cost. The defaults (8 profiles, 5 s + 30 s each at 100 req/s)
take about 5 minutes; --quick about 1 minute.

Per profile: SLO attainment (share of sent requests answered successfully within --slo-ms),
accuracy (correct / answered samples), cost per 1,000 requests (ensemble_cost_total when the
gateway exports it, else member calls, hedges and retries priced at their tier's
cost_per_request), p50/p99 latency (from each request's intended send time), hedges sent and
extra calls (hedges / member calls). Writes OUT/report.json, OUT/report.md and each run's
harness report under OUT/profiles/, prints the table and whether the two goals are met:
  1. some profile reaches >= 99% SLO attainment with accuracy within 0.5 points of `all` (at
     most 0.5 below it) at <= 50% of its cost;
  2. hedging cuts p99 by >= 5x for <= 5% extra calls (each X against X_nohedge).
Exit 0 when the runs completed (whatever the goals say), 2 when they could not run.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    config: Path = DEFAULT_CONFIG
    out: Path | None = None
    rps: float = 100.0
    duration_s: float = 30.0
    warmup_s: float = 5.0
    slo_ms: float = 25.0
    deadline_ms: float = 250.0
    feedback_share: float = 1.0
    profiles: tuple[str, ...] = ()
    """Profiles to run, in order; empty: every profile of the config, in its order."""
    seed: int = 0
    quiet: bool = False


def scenario_for(
    settings: Settings, profile: str, url: str, data: Path, model: str, duration_s: float, seed: int
) -> Scenario:
    """The harness scenario of one run, validated like any scenario file."""
    from loadtest.scenario import parse_scenario

    doc = {
        "name": f"straggler-{profile}",
        "description": f"Profile {profile} under a straggler replica.",
        "target": {"url": url},
        "protocol": "http_binary",
        "model": model,
        "request": {"data": str(data), "timeout_s": max(2.0, 4 * settings.deadline_ms / 1000)},
        "load": {"shape": "poisson", "rps": settings.rps, "duration_s": duration_s},
        "mix": [
            {
                "name": profile,
                "parameters": {"policy": profile, "timeout": round(settings.deadline_ms * 1000)},
            }
        ],
        "slo": {"latency_ms": {"p99": settings.slo_ms}},
        "feedback": {"share": settings.feedback_share},
        "seed": seed,
    }
    return parse_scenario(doc, source=f"<straggler {profile}>", base_dir=ROOT)


@dataclass(frozen=True)
class Target:
    """The gateway every profile runs against, and what the runs need to know about it."""

    url: str
    pid: int
    data: Path
    prices: Prices
    out: Path


async def run_profile(
    settings: Settings, profile: str, index: int, gw: Target, driver: str = NAME
) -> dict[str, Any]:
    """Warm up, then measure one profile; returns its row of the report. ``driver`` names
    the experiment in progress lines (another driver may run profiles this way)."""

    def say(line: str) -> None:
        progress(driver, line)

    if settings.warmup_s > 0:
        seed = settings.seed + 1 + index
        warm = scenario_for(
            settings, profile, gw.url, gw.data, gw.prices.model, settings.warmup_s, seed
        )
        say(f"{profile}: warm-up {settings.warmup_s:g} s")
        await drive(warm, gw.url, gw.data, settings.quiet)
    # Every profile's measured run has the same seed, so the same arrival times and the same
    # samples: differences in accuracy are the profiles', not sampling noise.
    sc = scenario_for(
        settings, profile, gw.url, gw.data, gw.prices.model, settings.duration_s, settings.seed
    )
    say(f"{profile}: measuring {settings.duration_s:g} s at {settings.rps:g} req/s")
    before = await scrape(gw.url)
    cpu_before = CpuReading.now(gw.pid)
    started = dt.datetime.now().astimezone()
    result, _marks = await drive(sc, gw.url, gw.data, settings.quiet)
    cpu_after = CpuReading.now(gw.pid)
    after = await scrape(gw.url)
    source = f"<straggler {profile}>"
    harness = harness_report(
        sc, result, gw.out / "profiles" / profile, url=gw.url, source=source, started=started
    )
    counts = gateway_counts(delta(before, after), gw.prices)
    attainment, within = slo_attainment(result, settings.slo_ms)
    cpu = cores(cpu_before, cpu_after)
    cpu["gateway_cpu_s"] = cpu_after.system - cpu_before.system
    row = _row(profile, harness, counts, attainment, within, cpu)
    row["learned_weights"] = learned_weights(after, profile)
    return row


def _row(
    profile: str,
    harness: dict[str, Any],
    counts: dict[str, Any],
    attainment: float | None,
    within: int,
    cpu: dict[str, float],
) -> dict[str, Any]:
    sent, calls = harness["requests"]["sent"], counts["calls"]

    def per_request(value: float, digits: int) -> float | None:
        return round(value / sent, digits) if sent else None

    return {
        "profile": profile,
        "sent": sent,
        "answered": harness["requests"]["answered"],
        "errors": harness["errors"],
        "within_slo": within,
        "slo_attainment": None if attainment is None else round(attainment, 6),
        "accuracy": harness["accuracy"],
        "latency_ms": harness["latency_ms"],
        "cost": counts["cost"],
        "cost_per_1k": per_request(1000 * counts["cost"], 6),
        "cost_source": counts["cost_source"],
        "cost_from_calls": counts["cost_from_calls"],
        "calls": calls,
        "calls_per_request": per_request(calls, 4),
        "members_asked_per_request": per_request(counts["members_asked"], 4),
        "hedges_sent": counts["hedges_sent"],
        "hedges_won": counts["hedges_won"],
        "retries": counts["retries"],
        "extra_calls_pct": round(100 * counts["hedges_sent"] / calls, 3) if calls else None,
        "member_calls": counts["member_calls"],
        "hedges": counts["hedges"],
        "feedback": harness["feedback"],
        "gateway_cpu_ms_per_request": per_request(1000 * cpu["gateway_cpu_s"], 3),
        "gateway_cores": cpu["system"],
        "generator_cores": cpu["generator"],
        # What the rest of the machine used meanwhile: other users of these cores skew numbers.
        "other_cores": cpu["others"],
        "steal_cores": cpu["steal"],
        "generator": {
            "send_lag_ms": harness["generator"]["send_lag_ms"],
            "cpu_percent": harness["generator"]["cpu_percent"],
            "saturated": harness["generator"]["generator_saturated"],
        },
        "warnings": harness["warnings"],
    }


def _straggler_of(config: Path) -> str:
    from ensemble.config import load_config

    cfg = load_config(config)
    found = [
        f"{m.name}@{p.tier} ({p.replicas.min} replica(s), {100 * p.straggler.probability:g}% "
        f"of calls {p.straggler.delay_ms:g} ms late)"
        for e in cfg.ensembles
        for m in e.members
        for p in m.placement
        if p.straggler is not None
    ]
    return "; ".join(found) or "none"


def say(line: str) -> None:
    progress(NAME, line)


def run(settings: Settings, command: str = "") -> Report:
    """Serve the config, measure every profile, write report.json and report.md; the report."""
    import uvloop

    from ensemble.auth import FEEDBACK_TOKEN_ENV
    from ensemble.config import load_config
    from ensemble.models import ensure_zoo
    from loadtest.gateway import start_gateway, stop_gateway

    cfg = load_config(settings.config)
    names = list(settings.profiles) or list(cfg.policies)
    unknown = [n for n in names if n not in cfg.policies]
    if unknown:
        raise ValueError(f"profile(s) not in {settings.config}: {', '.join(unknown)}")
    this = Run(NAME, settings.out, command)
    zoo = cfg.zoo_dir()
    ensure_zoo(zoo, progress=say)
    prices = Prices.of(settings.config)
    say(f"starting the gateway on {settings.config} (log: {this.out / 'gateway.log'})")
    rows: list[dict[str, Any]] = []

    async def all_profiles(target: Target) -> None:
        for i, name in enumerate(names):
            rows.append(await run_profile(settings, name, i, target))

    # Feedback needs the gateway's token: the gateway and the harness share one made for this run.
    with run_tokens(FEEDBACK_TOKEN_ENV):
        gw = start_gateway(settings.config, this.out / "gateway.log", 120)
        try:
            uvloop.run(
                all_profiles(Target(gw.url, gw.proc.pid, zoo / "test.npz", prices, this.out))
            )
        finally:
            exit_code = stop_gateway(gw, 60)
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out)),
        "straggler": _straggler_of(settings.config),
        "prices": {"tier": prices.tier, "hedge_by_member": prices.hedge},
        "gateway_exit_code": exit_code,
        "profiles": rows,
        "goals": goals_doc(goals(rows)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(
        parser,
        NAME,
        quick="A short run: 2 s warm-up + 5 s per profile (about 1 min) unless set below.",
    )
    add = parser.add_argument
    add("--duration", type=float, help="Measured seconds per profile (default 30; quick: 5).")
    add("--warmup", type=float, help="Warm-up seconds per profile (default 5; quick: 2).")
    add("--rps", type=float, default=100.0, help="Mean request rate (default 100).")
    add("--slo-ms", type=float, default=25.0, help="Latency SLO in ms (default 25).")
    add(
        "--deadline-ms",
        type=float,
        default=250.0,
        help="Request `timeout` parameter in ms (default 250: above the straggler's delay, so "
        "the gateway never answers partially because of it).",
    )
    add(
        "--feedback-share",
        type=float,
        default=1.0,
        help="Share of answers whose true labels are posted to the feedback API (default 1).",
    )
    add("--profiles", help="Comma-separated profiles to run, in order (default: all in CONFIG).")
    add(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Gateway config (default {DEFAULT_CONFIG.relative_to(ROOT)}).",
    )
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 30.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    if duration <= 0 or warmup < 0 or args.rps <= 0 or args.slo_ms <= 0 or args.deadline_ms <= 0:
        parser.error("--duration, --rps, --slo-ms and --deadline-ms must be positive")
    if not 0 < args.feedback_share <= 1:
        parser.error("--feedback-share must be in (0, 1]")
    return Settings(
        config=args.config.resolve(),
        out=args.out,
        rps=args.rps,
        duration_s=duration,
        warmup_s=warmup,
        slo_ms=args.slo_ms,
        deadline_ms=args.deadline_ms,
        feedback_share=args.feedback_share,
        profiles=split_list(args.profiles),
        seed=args.seed,
        quiet=args.quiet,
    )


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
