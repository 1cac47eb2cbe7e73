"""The autoscaling experiment's arithmetic (loadtest/autoscale_report.py) on synthetic data."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest import autoscale_report as ar
from loadtest.autoscale import parse_args, scenario_doc
from loadtest.experiment import by_name, goal_lines
from loadtest.scenario import parse_scenario


def labels(**tags: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(tags.items()))


def test_gateway_replicas_sums_the_current_gauge_per_tier() -> None:
    samples = {
        ("ensemble_autoscaler_replicas", labels(kind="current", member="a", tier="edge")): 3.0,
        ("ensemble_autoscaler_replicas", labels(kind="current", member="b", tier="edge")): 1.0,
        ("ensemble_autoscaler_replicas", labels(kind="desired", member="a", tier="cloud")): 4.0,
        ("ensemble_autoscaler_replicas", labels(kind="current", member="a", tier="cloud")): 2.0,
        ("ensemble_replica_ready", labels(member="a", replica="edge/0", tier="edge")): 1.0,
    }
    assert ar.gateway_replicas(samples) == {"edge": 4, "cloud": 2}


def test_gateway_replicas_without_a_control_loop_counts_ready_replicas() -> None:
    samples = {
        ("ensemble_replica_ready", labels(member="a", replica="edge/0", tier="edge")): 1.0,
        ("ensemble_replica_ready", labels(member="a", replica="edge/1", tier="edge")): 1.0,
        ("ensemble_replica_ready", labels(member="a", replica="cloud/0", tier="cloud")): 0.0,
        ("ensemble_replica_seconds_total", labels(member="a", tier="edge")): 10.0,
    }
    assert ar.gateway_replicas(samples) == {"edge": 2, "cloud": 0}
    assert ar.counter_by_tier(samples, "ensemble_replica_seconds_total") == {"edge": 10.0}


def test_ray_csv_becomes_a_timeline_relative_to_the_run() -> None:
    text = "wall_time,running,total\n100.5,1,1\n101.0,1,3\nbroken\n102.0,3,3\n"
    assert ar.ray_replicas(text, start_wall=100.0) == [
        (0.5, {"ray": 1}),
        (1.0, {"ray": 3}),
        (2.0, {"ray": 3}),
    ]


def test_replica_seconds_integrate_a_step_function() -> None:
    points: list[ar.ReplicaPoint] = [
        (0.2, {"edge": 1, "cloud": 0}),
        (10.0, {"edge": 3, "cloud": 2}),
        (20.0, {"edge": 3, "cloud": 0}),
    ]
    # Before the first sample the first sample's count holds.
    held = ar.replica_seconds(points, 30.0)
    assert held == pytest.approx({"edge": 10 * 1 + 20 * 3, "cloud": 10 * 2})
    assert ar.cost(held, {"edge": 0.0, "cloud": 0.36}) == pytest.approx(20 * 0.36 / 3600)


def test_ray_replicas_are_priced_edge_first() -> None:
    points: list[ar.ReplicaPoint] = [(0.0, {"ray": 1}), (10.0, {"ray": 5})]
    assert ar.ray_priced_seconds(points, 20.0) == pytest.approx(
        {"edge": 10 * 1 + 10 * 3, "cloud": 10 * 2}
    )


def row(t: int, p99: float | None, errors: int = 0) -> dict[str, Any]:
    return {"t": t, "errors": errors, "latency_ms": {"p99": p99}}


def test_reaction_to_a_step() -> None:
    step = ar.Step(at_s=5, until_s=15)
    timeline = [row(t, 50.0) for t in range(5)]
    timeline += [row(5, 400.0), row(6, 900.0), row(7, 100.0), row(8, 300.0, errors=0)]
    timeline += [row(9, None, errors=2)] + [row(t, 80.0) for t in range(10, 20)]
    # Bad seconds after the step: 5, 6, 8 (p99) and 9 (errors): back under for good at 10.
    assert ar.recovery_s(timeline, step, 250.0) == 5.0
    assert ar.bad_seconds(timeline, 250.0) == 4
    assert ar.recovery_s([row(t, 10.0) for t in range(20)], step, 250.0) == 0.0
    assert ar.recovery_s([row(t, 999.0) for t in range(20)], step, 250.0) is None
    points: list[ar.ReplicaPoint] = [(4.5, {"edge": 2}), (6.0, {"edge": 2}), (6.5, {"edge": 3})]
    assert ar.first_scale_up_s(points, step) == 1.5
    assert ar.first_scale_up_s(points[:2], step) is None


def test_host_stalls_are_counted_and_a_second_reaction_time_leaves_them_out() -> None:
    step = ar.Step(at_s=5, until_s=15)
    timeline = [row(t, 50.0) for t in range(5)] + [row(5, 400.0), row(6, 120.0)]
    # At 11 the generator itself could not send for 150 ms: a host stall, over the SLO.
    timeline += [{**row(t, 600.0 if t == 11 else 90.0), "lag_p99_ms": 150.0 if t == 11 else 2.0}
                 for t in range(7, 20)]  # fmt: skip
    assert ar.stall_seconds(timeline) == 1
    assert ar.recovery_s(timeline, step, 250.0) == 7.0  # back for good only at 12
    assert ar.recovery_s(timeline, step, 250.0, skip_stalls=True) == 1.0  # at 6, stall left out
    rows = [
        {"scenario": "step", "system": "static", "recovery_s": 0.0, "cost": 1.0,
         "slo_attainment": 1.0},
        {"scenario": "step", "system": "r3e", "recovery_s": 7.0, "recovery_excl_stalls_s": 1.0,
         "cost": 1.0, "slo_attainment": 1.0},
    ]  # fmt: skip
    (react,) = [g for g in ar.goals(rows) if g.name == ar.GOAL_REACT]
    assert react.passed is False and react.values["met_excl_stalls"]
    assert react.measured == "7 s; host stalls left out: 1 s (met)"


def test_step_of_the_shipped_scenarios() -> None:
    step = parse_scenario(scenario_doc("step", quick=False), source="step").load
    assert ar.step_of(step) == ar.Step(20, 80)
    spike = parse_scenario(scenario_doc("spike", quick=False), source="spike").load
    assert ar.step_of(spike) == ar.Step(20, 30)
    diurnal = parse_scenario(scenario_doc("diurnal", quick=False), source="diurnal").load
    assert ar.step_of(diurnal) is None
    quick = parse_scenario(scenario_doc("step", quick=True), source="quick").load
    assert ar.step_of(quick) == ar.Step(6, 24) and quick.duration_s == 36


def result(scenario: str, system: str, attainment: float, cost: float) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "system": system,
        "slo_attainment": attainment,
        "cost": cost,
        "recovery_s": 3.0 if system == "r3e" else None,
    }


def test_goals_compare_with_static_peak_at_the_same_attainment() -> None:
    rows = [
        result("step", "static", 0.995, 10.0),
        result("step", "r3e", 0.99, 6.0),  # 60 %, 0.5 points lower: same attainment, met
        result("step", "ray", 0.90, 2.0),  # cheap but far lower attainment: not met
        result("step", "other", 0.999, 8.0),  # 80 % of the cost: not met
    ]
    got = by_name(ar.goals(rows))
    assert [(x.subject, x.passed) for x in got[ar.GOAL_CHEAPER]] == [
        ("step/r3e", True),
        ("step/ray", False),
        ("step/other", False),
    ]
    assert [(x.subject, x.passed) for x in got[ar.GOAL_REACT]] == [
        ("step/r3e", True),
        ("step/ray", False),
        ("step/other", False),
    ]
    text = goal_lines(ar.goals(rows))
    assert text.startswith(f"goal {ar.GOAL_REACT}: NOT MET (step/ray, step/other)")
    assert "  step/r3e: 60% of its cost, attainment -0.50 points: met" in text


def test_arguments() -> None:
    quick = parse_args(["--quick", "--systems", "r3e", "--scenarios", "step"])
    assert quick.systems == ("r3e",) and quick.scenarios == ("step",) and quick.warmup_s == 2
    with pytest.raises(SystemExit):
        parse_args(["--systems", "nope"])


def test_medians_over_repeated_sweeps_feed_the_goals() -> None:
    def row(system: str, attained: float, cost: float, recovery: float | None) -> dict[str, Any]:
        return {
            "scenario": "step",
            "system": system,
            "slo_attainment": attained,
            "latency_ms": {"p99": 100.0},
            "cost": cost,
            "bad_seconds": 1,
            "recovery_s": recovery,
            "cores": {"steal": 0.05},
        }

    runs = [
        [row("static", 0.99, 1.0, None), row("r3e", 0.99, 0.6, 2.0)],
        [row("static", 1.00, 1.0, 4.0), row("r3e", 0.70, 0.9, None)],  # a disturbed run
        [row("static", 1.00, 1.0, 3.0), row("r3e", 0.995, 0.65, 3.0)],
    ]
    rows = {r["system"]: r for r in ar.median_rows(runs)}
    assert rows["r3e"]["runs"] == 3 and rows["r3e"]["slo_attainment"] == 0.99
    assert rows["r3e"]["cost"] == 0.65 and rows["r3e"]["recovery_s"] == 3.0
    assert rows["r3e"]["values"]["recovery_s"] == [2.0, None, 3.0]
    react, cost = ar.goals(list(rows.values()))
    assert react.subject == "step/r3e" and react.values["recovery_s"] == 3.0 and react.passed
    assert cost.passed and cost.values["cost_share_of_static"] == 0.65
    # Two of three reactions that never came: the median never came either.
    late = [[row("r3e", 0.9, 1.0, r)] for r in (None, None, 1.0)]
    assert ar.median_rows(late)[0]["recovery_s"] is None
    table = ar.median_table(list(rows.values()), 250.0)
    assert "| step | r3e | 3 | 99.00 % (99.0, 70.0, 99.5) |" in table
    assert "65 % (60, 90, 65)" in table and "3 (2, never, 3)" in table
