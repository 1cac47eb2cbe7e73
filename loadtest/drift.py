"""Data that drifts: how soon the gateway's drift score sees it, and what escalating uncertain
answers buys in accuracy and costs.

`python -m loadtest.drift` serves `loadtest/configs/drift.yaml` once and runs each profile on
the test split, then on the same split with a share of every row's pixels dropped.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loadtest.drift_report import Reading, goals, phase_row, render_markdown, summary
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
    settings_doc,
    split_list,
    write_report,
)
from loadtest.measure import Samples, drive_watched, harness_report, total

if TYPE_CHECKING:
    from loadtest.scenario import Scenario

NAME = "drift"
DEFAULT_CONFIG = CONFIGS / "drift.yaml"
PHASES = ("clean", "drifted")
SAMPLE_EVERY_S = 0.25

DESCRIPTION = """\
Data that drifts: detection, uncertainty and escalation.

Serves CONFIG (default loadtest/configs/drift.yaml: `logreg` answers alone unless unsure; the
other digits members on the edge and in the cloud; a drift window of 200 rows, threshold 0.1)
once, on free ports, and for each of --profiles (default plain, escalate: the same uncertainty
verdict, without and with escalation) runs through the load-test harness (open-loop Poisson at
--rps, HTTP binary tensors, one generator process, the same seed: the same arrivals and
samples) --clean seconds on the test split, then --drifted seconds on the same split with
--dropout of every row's pixels set to 0 (a dead or occluded sensor; seeded).

Per profile and phase: accuracy, cost per 1,000 requests, member calls per request, the share
of answers uncertain and escalated, p50/p99; from /metrics read every 0.25 s, the drift score
over time (its highest once a window of the phase's own rows is in) and the requests into the
drifted phase until it crossed its threshold.

Goals: the score stays below its threshold on clean data and crosses it within two windows of
rows once the data drifts; escalating keeps drifted accuracy >= 2 points above the same profile
without (its extra cost is stated). Writes OUT/report.json, OUT/report.md, the drifted data
under OUT/data/ and each run's harness report under OUT/PROFILE/PHASE/. The defaults take
about 1.5 minutes; --quick about 30 s. Exit 0 when the runs completed (whatever the goals
say), 2 when they could not run.
"""


@dataclass(frozen=True)
class Settings:
    """What one invocation measures."""

    config: Path = DEFAULT_CONFIG
    out: Path | None = None
    rps: float = 100.0
    clean_s: float = 10.0
    drifted_s: float = 30.0
    dropout: float = 0.2
    profiles: tuple[str, ...] = ("plain", "escalate")
    seed: int = 0
    quiet: bool = False


def say(line: str) -> None:
    progress(NAME, line)


def write_data(test: Path, out: Path, dropout: float, seed: int) -> dict[str, Path]:
    """The test split as is, and with ``dropout`` of each row's pixels zeroed."""
    split = np.load(test)
    x, y = split["X"].astype(np.float32), split["y"]
    mask = np.random.default_rng(seed).random(x.shape) >= dropout
    out.mkdir(parents=True, exist_ok=True)
    files = {"clean": out / "clean.npz", "drifted": out / "drifted.npz"}
    np.savez(files["clean"], X=x, y=y)
    np.savez(files["drifted"], X=(x * mask).astype(np.float32), y=y)
    return files


def scenario(url: str, model: str, profile: str, data: Path, seconds: float, rps: float,
             seed: int) -> Scenario:  # fmt: skip
    from loadtest.scenario import parse_scenario

    doc = {
        "name": f"drift-{profile}-{data.stem}",
        "description": f"Profile {profile} on {data.name}.",
        "target": {"url": url},
        "protocol": "http_binary",
        "model": model,
        "request": {"data": str(data), "timeout_s": 2.0},
        "load": {"shape": "poisson", "rps": rps, "duration_s": seconds},
        "mix": [{"name": profile, "parameters": {"policy": profile}}],
        "seed": seed,
    }
    return parse_scenario(doc, source=f"<drift {profile} {data.stem}>", base_dir=ROOT)


def reading(at: float, samples: Samples) -> Reading:
    drift = [v for (n, _), v in samples.items() if n == "ensemble_input_drift"]
    return Reading(
        at,
        drift[0] if drift else None,
        total(samples, "ensemble_requests_total"),
    )


def profile_rows(
    settings: Settings,
    url: str,
    model: str,
    window: int,
    files: dict[str, Path],
    out: Path,
    profile: str,
) -> list[dict[str, Any]]:
    """One profile: the clean phase, then the drifted one (``window``: the drift window)."""
    import uvloop

    from loadtest.measure import delta, scrape

    rows = []
    for phase in PHASES:
        seconds = settings.clean_s if phase == "clean" else settings.drifted_s
        sc = scenario(url, model, profile, files[phase], seconds, settings.rps, settings.seed)
        say(f"{profile}: {phase} data, {seconds:g} s at {settings.rps:g} req/s")
        started = dt.datetime.now().astimezone()

        async def measured(
            sc: Scenario = sc, data: Path = files[phase]
        ) -> tuple[Any, list[Reading], Samples]:
            before = await scrape(url)
            result, _marks, readings = await drive_watched(
                sc, url, data, settings.quiet, SAMPLE_EVERY_S, reading
            )
            return result, readings, delta(before, await scrape(url))

        result, readings, change = uvloop.run(measured())
        source = f"<drift {profile} {phase}>"
        harness = harness_report(
            sc, result, out / profile / phase, url=url, source=source, started=started
        )
        rows.append(phase_row(profile, phase, harness, change, readings, window))
    return rows


def run(settings: Settings, command: str = "") -> Report:
    """Serve the config, run every profile on clean then drifted data; the report."""
    from ensemble.config import load_config
    from ensemble.models import ensure_zoo
    from loadtest.gateway import start_gateway, stop_gateway

    cfg = load_config(settings.config)
    unknown = [p for p in settings.profiles if p not in cfg.policies]
    if unknown:
        raise ValueError(f"profile(s) not in {settings.config}: {', '.join(unknown)}")
    ensemble = cfg.ensembles[0]
    this = Run(NAME, settings.out, command)
    zoo = cfg.zoo_dir()
    ensure_zoo(zoo, progress=say)
    files = write_data(zoo / "test.npz", this.out / "data", settings.dropout, settings.seed)
    say(f"starting the gateway on {settings.config} (log: {this.out / 'gateway.log'})")
    gw = start_gateway(settings.config, this.out / "gateway.log", 120)
    rows: list[dict[str, Any]] = []
    try:
        for profile in settings.profiles:
            rows += profile_rows(
                settings, gw.url, ensemble.name, ensemble.drift.window, files, this.out, profile
            )
    finally:
        exit_code = stop_gateway(gw, 60)
    window, threshold = ensemble.drift.window, ensemble.drift.threshold
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out)),
        "gateway_exit_code": exit_code,
        "drift": {"window": window, "threshold": threshold},
        "runs": rows,
        "goals": goals_doc(goals(rows, window, threshold)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME, quick="A short run: 5 s clean + 10 s drifted per profile.")
    add = parser.add_argument
    add("--rps", type=float, default=100.0, help="Mean request rate (default 100).")
    add("--clean", type=float, help="Seconds on the test split per profile (default 10).")
    add("--drifted", type=float, help="Seconds on the drifted split per profile (default 30).")
    add("--dropout", type=float, default=0.2, help="Share of pixels zeroed (default 0.2).")
    add("--profiles", help="Profiles to run, comma-separated (default plain,escalate).")
    add(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Gateway config (default {DEFAULT_CONFIG.relative_to(ROOT)}).",
    )
    args = parser.parse_args(argv)
    clean = args.clean if args.clean is not None else (5.0 if args.quick else 10.0)
    drifted = args.drifted if args.drifted is not None else (10.0 if args.quick else 30.0)
    if min(clean, drifted, args.rps) <= 0 or not 0 < args.dropout < 1:
        parser.error("--clean, --drifted and --rps must be positive, --dropout in (0, 1)")
    return Settings(
        config=args.config.resolve(),
        out=args.out,
        rps=args.rps,
        clean_s=clean,
        drifted_s=drifted,
        dropout=args.dropout,
        profiles=split_list(args.profiles) or Settings().profiles,
        seed=args.seed,
        quiet=args.quiet,
    )


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
