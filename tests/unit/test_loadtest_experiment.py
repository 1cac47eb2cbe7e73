"""The drivers' shared scaffolding (loadtest/experiment.py): goals and their verdicts, tables,
report files, and how `Driver.main` turns a run's outcome into an exit code."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from loadtest import experiment
from loadtest.experiment import (
    Driver,
    Goal,
    Report,
    Run,
    goal_lines,
    goal_met,
    goals_doc,
    goals_of,
    markdown_table,
    num,
    pct,
    text_table,
    write_report,
)
from loadtest.fleet import TargetError


def test_a_goal_without_subjects_is_one_line_with_its_numbers() -> None:
    goals = [
        Goal("throughput vs Ray >= 30", "", "44.2", True),
        Goal("overhead <= 0.5 ms", "", "0.87", False),
        Goal("ceiling >= 0.5", "", "None", None),
    ]
    assert goal_lines(goals) == (
        "goal throughput vs Ray >= 30: 44.2: MET\n"
        "goal overhead <= 0.5 ms: 0.87: NOT MET\n"
        "goal ceiling >= 0.5: None: n/a"
    )


def test_every_subject_must_meet_a_goal_unless_one_is_enough() -> None:
    every = [Goal("answered", "kill", "100 %", True), Goal("answered", "slow", "99 %", False)]
    assert goal_met(every) is False
    assert goal_lines(every).splitlines() == [
        "goal answered: NOT MET (slow)",
        "  kill: 100 %: met",
        "  slow: 99 %: NOT met",
    ]
    some = [Goal("cheap", p, "", p == "b", need="any") for p in ("a", "b", "c")]
    assert goal_met(some) is True
    assert goal_lines(some).splitlines()[0] == "goal cheap: MET by b"
    assert goal_lines([Goal("cheap", "a", "", False, need="any")]).startswith("goal cheap: NOT MET")
    assert goal_met([Goal("x", "a", "", None)]) is None


def test_goals_go_through_report_json_and_back() -> None:
    goals = [Goal("g", "s", "1 s", True, {"recovery_s": 1.0}, need="any")]
    doc = json.loads(json.dumps({"goals": goals_doc(goals)}))
    assert goals_of(doc) == goals


def test_numbers_and_tables() -> None:
    assert num(None, ".1f") == "n/a" and num(float("nan"), ".1f") == "n/a"
    assert num(2.345, ".2f", " s") == "2.35 s" and pct(0.12345) == "12.35 %"
    assert markdown_table(["a", "b"], [[1, "x"], [2, None]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2 | None |"
    )
    assert text_table(["system", "c=1"], [["noop", "10"], ["gateway-http", "1000"]]) == (
        "system         c=1\nnoop            10\ngateway-http  1000"
    )


def test_a_run_writes_its_report_in_its_own_directory(tmp_path: Path) -> None:
    run = Run("demo", tmp_path / "out", "python -m loadtest.demo --x")
    report: Report = {**run.header(), "rows": (1, 2)}
    assert report["driver"] == "demo" and report["out"] == str(tmp_path / "out")
    assert report["machine"]["cpus"] >= 1 and "git" in report["machine"]
    written = write_report(run.out, report, "# Demo")
    assert written["rows"] == [1, 2]  # as the JSON file says
    assert json.loads((run.out / "report.json").read_text()) == written
    assert (run.out / "report.md").read_text() == "# Demo\n"


def test_a_run_without_out_gets_a_dated_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiment, "RESULTS_DIR", tmp_path)
    run = Run("demo", None)
    assert run.out.parent == tmp_path and run.out.name.startswith("demo-")
    assert run.command == "python -m loadtest.demo"


class Boom(RuntimeError):
    """A measurement that went wrong."""


def driver(tmp_path: Path, outcome: BaseException | None, missed: bool = False) -> Driver[str]:
    def run(settings: str, command: str) -> Report:
        if outcome is not None:
            raise outcome
        return {"out": str(tmp_path), "command": command, "settings": settings}

    def parse(argv: Sequence[str] | None) -> str:
        return ",".join(argv or [])

    def exit_code(_report: dict[str, Any]) -> int:
        return 1 if missed else 0

    return Driver("demo", parse, run, lambda r: f"ran {r['settings']}", (Boom,), exit_code)


def test_main_prints_the_summary_and_maps_failures_to_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert driver(tmp_path, None).main(["a", "b"]) == 0
    out = capsys.readouterr().out
    assert out == f"ran a,b\nreport: {tmp_path / 'report.md'}\n"
    assert driver(tmp_path, None, missed=True).main([]) == 1
    assert driver(tmp_path, Boom("3 failed requests")).main([]) == 1
    assert "demo: FAILED: 3 failed requests" in capsys.readouterr().err
    assert driver(tmp_path, TargetError("unreachable")).main([]) == 2
    assert driver(tmp_path, ValueError("bad profile")).main([]) == 2
    assert "demo: cannot run: bad profile" in capsys.readouterr().err
    assert driver(tmp_path, KeyboardInterrupt()).main([]) == 130
