"""`python -m loadtest.deadline` on a real gateway: the report adds up, live estimates meet the
tight deadline from the edge where the card-based choice calls the cloud, and follow the link."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import deadline
from loadtest.deadline import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("deadline")
    settings = Settings(out=out, rps=50, duration_s=2, warmup_s=0.5, link_duration_s=6, quiet=True)
    result = deadline.run(settings, "test")
    assert json.loads((out / "report.json").read_text()) == result
    assert (out / "report.md").read_text().startswith("# Live estimates under a tight")
    for name in settings.profiles:
        assert (out / "profiles" / name / "report.json").is_file()
    for name in settings.link_profiles:
        assert (out / "link" / name / "report.json").is_file()
    return result


def cloud_calls(row: dict[str, Any]) -> int:
    return sum(
        n
        for tiers in row["member_calls"].values()
        for tier, outcomes in tiers.items()
        if tier == "cloud"
        for n in outcomes.values()
    )


def test_the_tight_deadline_is_met_from_the_edge(report: dict[str, Any]) -> None:
    assert report["gateway_exit_code"] == 0
    rows = {r["profile"]: r for r in report["tight"]}
    assert list(rows) == ["live", "card", "all", "edge_only"]
    for r in rows.values():
        assert r["sent"] > 50 and r["answered"] + sum(r["errors"].values()) == r["sent"]
    assert rows["live"]["slo_attainment"] >= 0.95 and cloud_calls(rows["live"]) == 0
    assert rows["card"]["slo_attainment"] < 0.5 and cloud_calls(rows["card"]) > 0
    assert rows["live"]["accuracy"] == rows["edge_only"]["accuracy"]  # same samples, same member


def test_live_choices_follow_the_link(report: dict[str, Any]) -> None:
    live = report["link"]["profiles"]["live"]
    near, far, again = (p["cloud_calls_per_request"] for p in live["phases"])
    # The far phase lasts 2 s here; its first requests, before a reading of the link shows
    # the change (adapt_s, at most 2 s, below), may still go to the cloud.
    assert near > 0.5 and again > 0.5
    assert far < 0.25 and far < near / 4
    assert [a["cloud"] for a in live["adapt_s"]] == ["stopped", "resumed"]
    assert all(a["after_s"] is not None and a["after_s"] < 2 for a in live["adapt_s"])
    card = report["link"]["profiles"]["card"]
    assert card["phases"][1]["cloud_calls_per_request"] > 0.5  # blind to the link
    assert card["phases"][1]["met"] < 0.5
    assert {g["name"].split(" (")[0] for g in report["goals"]} == {
        "tight deadline",
        "changing link",
    }
