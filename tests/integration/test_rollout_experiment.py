"""`python -m loadtest.rollout` on real gateways: the report adds up, the worse canary is rolled
back and the better one promoted, and every response was a 200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import rollout
from loadtest.experiment import goals_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_canaries_are_decided_and_nothing_is_lost(zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rollout"
    code = rollout.main(["--quick", "--out", str(out), "--min-labels", "80", "--min-calls", "30",
                         "--weight", "0.3", "--clients", "1"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Canary rollouts decided by evidence")
    [run] = report["runs"]
    assert run["gateway_exit_code"] == 0
    assert run["decided"]["falling"]["phase"] == "rolled_back"
    assert run["decided"]["rising"]["phase"] == "promoted"
    assert run["decided"]["falling"]["evidence"]["2"]["labelled"] >= 80
    assert run["unload"] == {"status": 200, "versions_after": ["1"]}
    assert set(run["traffic"]) == {"200"} and set(run["statuses"]) == {"200"}
    assert all(goal.passed for goal in goals_of(report))
