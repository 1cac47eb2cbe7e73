"""`python -m loadtest.resilience` on a short load: three faults on real gateway and replica
processes, and the report says what happened (no latency asserts: the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import resilience
from loadtest.experiment import goals_of
from loadtest.recovery import RecoveryRule
from loadtest.resilience import Settings
from loadtest.resilience_report import ANSWERED, GOAL_ANSWERED, table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MISSED_BY_THE_CLOUD = 0.05
"""Share of answers that may miss a Ray cloud member (flagged degraded) outside a partition."""
RPS, DURATION_S = 25.0, 10.0
"""Light enough that the Ray cloud keeps up on two cores busy with the rest of the suite (at
40 req/s a replica restart's CPU spike once pushed cloud calls past the 1 s deadline); long
enough that the killed replica (restarted at 3.5 s) is back well before the load ends (one CI
run took over 3.5 s to start it)."""


@pytest.fixture(scope="module")
def report(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("resilience")
    settings = Settings(
        out=out,
        rps=RPS,
        duration_s=DURATION_S,
        warmup_s=2.0,  # the Ray members' first calls are slow: not part of the measure
        fault_at_s=2.0,
        fault_s=1.5,
        rule=RecoveryRule(window=10, baseline_from_s=0.5),
        quiet=True,
    )
    result = resilience.run(settings, "test")
    assert json.loads((out / "report.json").read_text()) == result
    assert (out / "report.md").read_text().startswith("# Faults under load")
    for fault in resilience.FAULTS:
        assert (out / fault / "report.json").is_file()
        assert (out / fault / "gateway.yaml").is_file()
    return result


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["fault"]: r for r in report["faults"]}


def test_three_faults_ran_and_the_table_has_a_row_each(report: dict[str, Any]) -> None:
    assert [r["fault"] for r in report["faults"]] == list(resilience.FAULTS)
    lines = table(report).splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith("| partition |")
    answered = {g.subject: g.passed for g in goals_of(report) if g.name == ANSWERED}
    for r in report["faults"]:
        assert r["fault_applied"], r["marks"]
        assert r["gateway_exit_code"] == 0, r["fault"]
        # Every replica process (the killed one's second life included) exits 0 on SIGTERM.
        assert set(r["replica_exit_codes"].values()) == {0}, r["replica_exit_codes"]
        run = r["run"]
        assert run["sent"] == int(RPS * DURATION_S)  # constant load, bounded in count
        assert run["answered"] + sum(run["errors"].values()) == run["sent"]
        window = r["window"]
        assert window["start_s"] == pytest.approx(2.0, abs=0.01)
        assert window["start_s"] < window["end_s"] < DURATION_S
        assert window["sent"] > 0
        assert answered[r["fault"]] == (run["answered_share"] >= GOAL_ANSWERED)


def test_cloud_partition_answers_from_the_edge_flagged_degraded(report: dict[str, Any]) -> None:
    r = rows(report)["partition"]
    window = r["window"]
    assert window["answered"] == window["sent"]
    # Answers in the window miss the cloud members and say so; before it, at most the few a
    # stalled Ray call can cost (see MISSED_BY_THE_CLOUD).
    assert window["degraded"] >= 0.9 * window["sent"]
    assert r["baseline"]["degraded"] <= MISSED_BY_THE_CLOUD * r["baseline"]["sent"]
    assert r["run"]["degraded"] >= window["degraded"]
    assert r["gateway"]["degraded_answers"] == r["run"]["degraded"]


def test_the_killed_replica_came_back_and_its_calls_were_answered(
    report: dict[str, Any],
) -> None:
    r = rows(report)["kill"]
    assert r["restarts"] == {"forest_a": 1}
    messages = [m["message"] for m in r["marks"]]
    assert messages[0].startswith("replica forest_a killed (SIGKILL, pid ")
    assert messages[-1] == "replica forest_a ready again"
    # Round robin sent half of forest's calls to forest_a: the ones that hit the dead process
    # were retried on forest_b, so every request was answered. Answers stay whole apart from a
    # few the Ray cloud missed: on two cores shared with the suite, a Ray call now and then
    # outlasts the 1 s deadline (seen in 1 of 7 runs, 1 answer), which the answer then says.
    assert r["run"]["errors"] == {}
    assert r["run"]["degraded"] <= MISSED_BY_THE_CLOUD * r["run"]["sent"]
    # The restarted process took its share of calls again.
    assert r["replica_requests"]["forest_a"] > 0
    assert r["replica_requests"]["forest_b"] > r["replica_requests"]["forest_a"]


def test_the_slow_replica_kept_answering(report: dict[str, Any]) -> None:
    r = rows(report)["slow"]
    assert r["run"]["errors"] == {}
    assert r["run"]["degraded"] <= MISSED_BY_THE_CLOUD * r["run"]["sent"]
    messages = [m["message"] for m in r["marks"]]
    assert messages == ["replica forest_b slow (+200 ms) for 1.5 s", "replica forest_b fast again"]
    assert r["replica_requests"]["forest_b"] > 0 and r["replica_requests"]["forest_a"] > 0
    assert r["restarts"] == {}
