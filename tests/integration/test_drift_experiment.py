"""`python -m loadtest.drift` on a real gateway: the report adds up, the drift score stays low on
the test split and crosses its threshold on the drifted one, and escalation asks more members
only for the uncertain answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import drift
from loadtest.drift import Settings
from loadtest.drift_report import crossing

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("drift")
    result = drift.run(Settings(out=out, clean_s=3, drifted_s=6, quiet=True), "test")
    assert json.loads((out / "report.json").read_text()) == result
    assert (out / "report.md").read_text().startswith("# Data that drifts")
    assert (out / "data" / "drifted.npz").is_file()
    for profile in ("plain", "escalate"):
        for phase in ("clean", "drifted"):
            assert (out / profile / phase / "report.json").is_file()
    return result


def rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["profile"], r["phase"]): r for r in report["runs"]}


def test_the_drift_score_sees_the_drifted_data(report: dict[str, Any]) -> None:
    assert report["gateway_exit_code"] == 0
    threshold = report["drift"]["threshold"]
    for (profile, phase), r in rows(report).items():
        assert r["sent"] > 200 and r["answered"] == r["sent"], (profile, phase)
        if phase == "clean":
            assert r["drift_max"] is None or r["drift_max"] < threshold
        else:
            assert crossing(r, threshold) is not None and r["drift_max"] >= threshold


def test_escalation_asks_more_members_only_when_unsure(report: dict[str, Any]) -> None:
    by = rows(report)
    plain, escalate = by[("plain", "drifted")], by[("escalate", "drifted")]
    assert plain["escalated"] == 0 and plain["calls_per_request"] == 1.0
    assert escalate["uncertain"] == pytest.approx(plain["uncertain"], abs=0.05)  # same verdict
    assert escalate["escalated"] == escalate["uncertain"] > by[("escalate", "clean")]["uncertain"]
    assert escalate["calls_per_request"] == pytest.approx(1 + 4 * escalate["escalated"], abs=0.05)
    assert escalate["cost_per_1k"] > plain["cost_per_1k"]
