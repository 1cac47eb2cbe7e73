"""What every experiment driver shares: its command line, goals, tables and report files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "loadtest" / "configs"
SCENARIOS = ROOT / "loadtest" / "scenarios"
RESULTS_DIR = ROOT / "loadtest" / "results"
EXIT_DONE, EXIT_FAILED, EXIT_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 130

Report = dict[str, Any]
S = TypeVar("S")


def progress(driver: str, line: str) -> None:
    """A progress line on stderr, prefixed with the driver's name."""
    print(f"{driver}: {line}", file=sys.stderr, flush=True)


# --- command line ------------------------------------------------------------------------------


def new_parser(driver: str, description: str) -> argparse.ArgumentParser:
    """`python -m loadtest.DRIVER`'s parser; the description is shown as written."""
    return argparse.ArgumentParser(
        prog=f"python -m loadtest.{driver}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_common(
    parser: argparse.ArgumentParser,
    driver: str,
    *,
    quick: str | None = None,
    seed: bool = True,
    quiet: bool = True,
) -> None:
    """The options drivers share: ``--out`` always; ``--quick`` (with its help) when the driver
    has a short mode; ``--seed`` and ``--quiet`` when it runs harness scenarios."""
    default = f"{RESULTS_DIR.relative_to(ROOT)}/{driver}-<YYYYmmdd-HHMMSS>/"
    parser.add_argument("--out", type=Path, help=f"Report directory (default {default}).")
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="Seed of arrivals and samples.")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="No progress lines from the runs.")


def split_list(text: str | None) -> tuple[str, ...]:
    """A comma-separated option as a tuple, blanks left out."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def command_line(driver: str, argv: Sequence[str] | None) -> str:
    """The command as a person would type it again."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python -m loadtest.{driver}", *args])


# --- the run and the machine it ran on --------------------------------------------------------


def git_state() -> str:
    """The commit the code is at, and whether tracked files have changed since."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def machine() -> dict[str, Any]:
    """Facts about the machine a run is about to use."""
    names: list[str] = []
    memory_gib: float | None = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
        memory_gib = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": names[0] if names else platform.processor(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }


class Run:
    """One invocation of a driver: its output directory, its clock, the machine's state."""

    def __init__(self, driver: str, out: Path | None, command: str = "") -> None:
        self.driver = driver
        self.started = dt.datetime.now().astimezone()
        self.clock = time.monotonic()
        self.out = out or RESULTS_DIR / f"{driver}-{self.started:%Y%m%d-%H%M%S}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.command = command or f"python -m loadtest.{driver}"
        self.machine = machine()

    def header(self) -> Report:
        """What every report.json starts with."""
        return {
            "driver": self.driver,
            "command": self.command,
            "started_at": self.started.isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - self.clock, 1),
            "machine": self.machine,
            "out": str(self.out),
        }


def header_lines(report: Report) -> list[str]:
    """The Markdown bullets every report.md starts with: command, machine, when, how long."""
    m = report["machine"]
    return [
        f"- command: `{report['command']}`",
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu') or 'unknown CPU'}), {m.get('platform')}, "
        f"Python {m.get('python')}; load average before: {m.get('loadavg_before')}; "
        f"code: {m.get('git')}",
        f"- started {report['started_at']}, took {float(report['elapsed_s']):.0f} s",
    ]


def settings_doc(settings: object, **extra: object) -> dict[str, Any]:
    """A settings dataclass as JSON-able fields (paths as strings), with ``extra`` added."""
    assert dataclasses.is_dataclass(settings) and not isinstance(settings, type)
    doc = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    return {**doc, **extra}


def write_report(out: Path, report: Report, markdown: str) -> Report:
    """OUT/report.json and OUT/report.md; returns the JSON as written (tuples become lists)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"
    (out / "report.json").write_text(text)
    (out / "report.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    written: Report = json.loads(text)
    return written


@contextlib.contextmanager
def run_tokens(*names: str) -> Iterator[None]:
    """Each environment variable of ``names`` that is unset holds a fresh random token for the
    run (the gateway started inside inherits it, the harness reads it), and is unset again
    after: a driver run in another process's environment (a test's) leaves it as it was."""
    added = [name for name in names if not os.environ.get(name)]
    for name in added:
        os.environ[name] = secrets.token_hex(16)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# --- goals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One goal judged on one subject: the numbers that decided it, and the verdict."""

    name: str
    """The goal with its target, e.g. `recovery <= 5 s after the fault ends`."""
    subject: str
    """What it was judged on (a fault, a profile, `step/r3e`); empty for the whole run."""
    measured: str
    """The deciding numbers, as a person reads them."""
    passed: bool | None
    """None: nothing could be judged (a measurement is missing)."""
    values: dict[str, Any] = field(default_factory=dict)
    """The deciding numbers, for report.json."""
    need: Literal["all", "any"] = "all"
    """Whether the goal is met when every subject meets it, or when one does."""


def goal_met(goals: Sequence[Goal]) -> bool | None:
    """The verdict over a goal's subjects (None when none of them could be judged)."""
    judged = [g.passed for g in goals if g.passed is not None]
    if not judged:
        return None
    return any(judged) if goals[0].need == "any" else all(g.passed is True for g in goals)


def by_name(goals: Iterable[Goal]) -> dict[str, list[Goal]]:
    """Goals grouped by name, in the order they first appear."""
    grouped: dict[str, list[Goal]] = {}
    for g in goals:
        grouped.setdefault(g.name, []).append(g)
    return grouped


def _verdict(passed: bool | None, met: str = "met", missed: str = "NOT met") -> str:
    return "n/a" if passed is None else met if passed else missed


def goal_lines(goals: Sequence[Goal]) -> str:
    """A line per goal with its verdict, then a line per subject with its numbers."""
    lines = []
    for name, group in by_name(goals).items():
        met = goal_met(group)
        if len(group) == 1 and not group[0].subject:
            lines.append(f"goal {name}: {group[0].measured}: {_verdict(met, 'MET', 'NOT MET')}")
            continue
        if group[0].need == "any":
            winners = [g.subject for g in group if g.passed]
            verdict = f"MET by {', '.join(winners)}" if winners else "NOT MET"
        else:
            missed = [g.subject for g in group if not g.passed]
            verdict = "MET" if met else f"NOT MET ({', '.join(missed)})"
        lines.append(f"goal {name}: {verdict}")
        lines += [f"  {g.subject}: {g.measured}: {_verdict(g.passed)}" for g in group]
    return "\n".join(lines)


def goals_doc(goals: Sequence[Goal]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(g) for g in goals]


def goals_of(report: Report) -> list[Goal]:
    """The goals of a report.json, back as Goal objects."""
    return [Goal(**g) for g in report.get("goals", [])]


# --- numbers and tables ------------------------------------------------------------------------


def num(value: float | None, spec: str, unit: str = "") -> str:
    """``value`` formatted, or `n/a` (for None and NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) + unit


def pct(share: float | None, spec: str = ".2f") -> str:
    """A share as a percentage, or `n/a`."""
    return "n/a" if share is None else f"{100 * share:{spec}} %"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Plain columns for a terminal: the first left-aligned, the others right-aligned."""
    cells = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded))
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Driver(Generic[S]):
    """A driver's parts, which `main` runs the same way for all: parse the arguments, run,
    print the summary; exit 2 when the run could not start, 130 on Ctrl-C."""

    name: str
    parse: Callable[[Sequence[str] | None], S]
    run: Callable[[S, str], Report]
    summary: Callable[[Report], str]
    failures: tuple[type[Exception], ...] = ()
    """Errors that mean the measurement went wrong (exit 1), not that it could not start."""
    exit_code: Callable[[Report], int] = lambda _report: EXIT_DONE

    def main(self, argv: Sequence[str] | None = None) -> int:
        from ensemble.errors import ConfigError
        from loadtest.fleet import TargetError
        from loadtest.peers import PeerError
        from loadtest.scenario import ScenarioError

        settings = self.parse(argv)
        try:
            report = self.run(settings, command_line(self.name, argv))
        except ConfigError as exc:
            print("\n".join(exc.errors), file=sys.stderr)
            progress(self.name, f"cannot run: invalid config {exc.source}")
            return EXIT_UNUSABLE
        except self.failures as exc:
            progress(self.name, f"FAILED: {exc}")
            return EXIT_FAILED
        except (ValueError, OSError, RuntimeError, TargetError, ScenarioError, PeerError) as exc:
            progress(self.name, f"cannot run: {exc}")
            return EXIT_UNUSABLE
        except KeyboardInterrupt:
            progress(self.name, "interrupted")
            return EXIT_INTERRUPTED
        print(self.summary(report))
        print(f"report: {Path(report['out']) / 'report.md'}")
        return self.exit_code(report)
