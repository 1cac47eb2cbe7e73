"""`python -m loadtest.straggler`: every profile measured on a real gateway, the report adds up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import straggler
from loadtest.experiment import Goal, by_name, goal_lines, goals_of
from loadtest.straggler import DEFAULT_CONFIG, Settings
from loadtest.straggler_report import GOAL_COST, GOAL_HEDGING, goals
from tests.integration.process import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILES = [
    "all",
    "all_nohedge",
    "best_single",
    "best_single_nohedge",
    "cascade",
    "slo_greedy",
    "exp4",
    "cocktail",
]
EDGE, CLOUD = 0.00001, 0.0001  # loadtest/configs/straggler.yaml's tier prices


def config_with_a_straggler_in_play(zoo_dir: Path, out: Path) -> Path:
    """straggler.yaml with round-robin routing and the straggler late on half its calls (model
    paths made absolute).

    At 50 req/s for 2 s the shipped config hedges only when one of the straggler's late calls
    falls in the measured window: p2c keeps away from the straggler once it was late, and sends
    it a dozen calls there, none of them late about a quarter of the time. Round robin gives it
    half of forest's calls, and at 50% late dozens of them run past the 10 ms hedge delay: every
    profile that asks forest hedges, as much as its budget allows (the warm-up spends the
    burst)."""
    text = DEFAULT_CONFIG.read_text()
    edits = {
        "routing: {name: p2c}": ("routing: {name: round_robin}", 8),
        "probability: 0.1,": ("probability: 0.5,", 1),
        "../../models/digits": (str(zoo_dir), 8),  # seven members and the zoo
    }
    for old, (new, count) in edits.items():
        assert text.count(old) == count, old
        text = text.replace(old, new)
    path = out / "straggler.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def report(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("straggler")
    config = config_with_a_straggler_in_play(zoo_dir, tmp_path_factory.mktemp("config"))
    settings = Settings(config=config, out=out, rps=50, duration_s=2, warmup_s=1, quiet=True)
    result = straggler.run(settings, "test")
    assert json.loads((out / "report.json").read_text()) == result
    assert (out / "report.md").read_text().startswith("# Policy profiles under a straggler")
    for name in PROFILES:
        assert (out / "profiles" / name / "report.json").is_file()
    return result


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["profile"]: r for r in report["profiles"]}


def test_every_profile_ran_in_config_order_on_a_clean_gateway(report: dict[str, Any]) -> None:
    assert [r["profile"] for r in report["profiles"]] == PROFILES
    assert report["gateway_exit_code"] == 0
    assert report["straggler"].startswith("forest@edge_b (1 replica(s), 50% of calls 100 ms late")
    assert report["machine"]["cpus"] >= 1


def test_counts_add_up(report: dict[str, Any]) -> None:
    for r in report["profiles"]:
        name = r["profile"]
        assert r["sent"] > 50, name  # ~100 planned: 50 req/s for 2 s
        assert r["answered"] + sum(r["errors"].values()) == r["sent"], name
        assert r["within_slo"] <= r["answered"], name
        assert r["slo_attainment"] == pytest.approx(r["within_slo"] / r["sent"], abs=1e-6)
        # Every answer's true labels went back, and the gateway joined them all.
        assert r["feedback"] == {
            "share": 1.0,
            "sent": r["answered"],
            "accepted": r["answered"],
            "errors": {},
        }, name
        calls = sum(
            n for tiers in r["member_calls"].values() for o in tiers.values() for n in o.values()
        )
        assert calls == r["calls"], name
        assert r["hedges_sent"] == sum(h.get("sent", 0) for h in r["hedges"].values()), name
        assert r["hedges_won"] <= r["hedges_sent"], name
        assert r["retries"] >= 0, name
        assert r["extra_calls_pct"] == pytest.approx(100 * r["hedges_sent"] / r["calls"], abs=1e-3)
        assert r["cost_per_1k"] == pytest.approx(1000 * r["cost"] / r["sent"], rel=1e-4), name
        # The gateway's own cost counter (when it has one) agrees with calls x tier prices.
        assert r["cost"] == pytest.approx(r["cost_from_calls"], rel=2e-3), name
        assert 0.9 <= r["accuracy"] <= 1.0, name
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"], name


def test_profiles_ask_the_members_they_should(report: dict[str, Any]) -> None:
    by = rows(report)
    # Every answered request called each of its members once (hedges are not calls); a request
    # that failed (a 504 on a starved machine) may have called them too.
    for name in ("all", "all_nohedge", "exp4"):
        assert 7 * by[name]["answered"] <= by[name]["calls"] <= 7 * by[name]["sent"], name
    for name in ("best_single", "best_single_nohedge"):
        assert set(by[name]["member_calls"]) == {"forest"}, name
        assert by[name]["answered"] <= by[name]["calls"] <= by[name]["sent"], name
    assert 1 <= by["cascade"]["calls_per_request"] <= 7
    assert 1 <= by["cocktail"]["members_asked_per_request"] <= 7
    # Without hedges the cost is that of 5 edge + 2 cloud calls, or one edge call, per request
    # (up to a rare retry, or a request that failed).
    exact = 1000 * (5 * EDGE + 2 * CLOUD)
    assert by["all_nohedge"]["cost_per_1k"] == pytest.approx(exact, rel=0.05)
    assert by["best_single_nohedge"]["cost_per_1k"] == pytest.approx(1000 * EDGE, rel=0.05)
    assert set(by["exp4"]["learned_weights"]) == set(by["all"]["member_calls"])


def test_only_hedging_profiles_hedge(report: dict[str, Any]) -> None:
    by = rows(report)
    for name in PROFILES:
        if name.endswith("_nohedge"):
            assert by[name]["hedges_sent"] == 0, name
    # The straggler is late on half of its calls (the fixture's config): they outlast the delay.
    for name in ("all", "best_single", "exp4"):
        assert by[name]["hedges_sent"] > 0, name
    for name in PROFILES:
        if not name.endswith("_nohedge"):
            assert by[name]["hedges_sent"] <= 0.05 * by[name]["calls"] + 10, name  # budget, burst


def test_goals_are_computed_for_every_pair(report: dict[str, Any]) -> None:
    g = by_name(goals_of(report))
    assert [x.subject for x in g[GOAL_COST]] == PROFILES[1:]
    assert all(x.need == "any" and isinstance(x.passed, bool) for x in g[GOAL_COST])
    pairs = [x.subject for x in g[GOAL_HEDGING]]
    assert pairs == ["all vs all_nohedge", "best_single vs best_single_nohedge"]
    assert all(isinstance(x.passed, bool) for x in g[GOAL_HEDGING])
    text = goal_lines(goals_of(report))
    assert text.startswith("goal 1 (>= 99% SLO attainment") and "goal 2 (hedging cuts p99" in text


def test_help_explains_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.straggler", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for word in ("--quick", "--duration", "--rps", "--out", "SLO attainment", "X_nohedge"):
        assert word in proc.stdout, word


def row(
    name: str, attainment: float, accuracy: float, cost: float, p99: float, extra: float
) -> dict[str, Any]:
    return {
        "profile": name,
        "slo_attainment": attainment,
        "accuracy": accuracy,
        "cost_per_1k": cost,
        "latency_ms": {"p99": p99},
        "extra_calls_pct": extra,
    }


def test_goal_arithmetic() -> None:
    result = goals(
        [
            row("all", 0.95, 0.970, 0.25, 20.0, 3.0),
            row("all_nohedge", 0.94, 0.971, 0.25, 110.0, 0.0),
            row("cheap", 0.995, 0.9651, 0.10, 5.0, 1.0),  # 0.49 points below, 40% of the cost
            row("cheap_nohedge", 0.98, 0.9651, 0.10, 100.0, 0.0),
            row("worse", 0.999, 0.964, 0.01, 5.0, 6.0),  # 0.6 points below
        ]
    )
    first = {x.subject: x.passed for x in by_name(result)[GOAL_COST]}
    assert first == {"all_nohedge": False, "cheap": True, "cheap_nohedge": False, "worse": False}
    pairs = {x.subject: (x.values["p99_cut"], x.passed) for x in by_name(result)[GOAL_HEDGING]}
    assert pairs == {"all vs all_nohedge": (5.5, True), "cheap vs cheap_nohedge": (20.0, True)}
    text = goal_lines(result)
    assert f"goal {GOAL_COST}: MET by cheap\n" in text and f"goal {GOAL_HEDGING}: MET\n" in text
    result = goals(
        [row("all", 0.95, 0.97, 0.25, 30.0, 3.0), row("all_nohedge", 0.9, 0.97, 0.25, 110.0, 0.0)]
    )
    (cost, hedging) = result
    assert hedging.values["p99_cut"] == pytest.approx(3.667, abs=1e-3)
    assert hedging.passed is False and cost.passed is False
    assert goals([row("cheap", 0.99, 0.97, 0.1, 5.0, 1.0)]) == [
        Goal(GOAL_COST, "", "no profile to compare with `all`", None),
        Goal(GOAL_HEDGING, "", "no X / X_nohedge pair of profiles", None),
    ]
