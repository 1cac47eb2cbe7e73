"""`python -m loadtest.split` on a real gateway: every way measured under each link, the
policy's choice following the link, every request answered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import split
from loadtest.experiment import goals_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_policy_is_measured_against_every_way(zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    assert split.main(["--requests", "15", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Split computing under three links")
    assert report["gateway_exit_code"] == 0
    assert [r["link"] for r in report["links"]] == list(split.LINKS)
    for r in report["links"]:
        assert list(r["ways"])[:2] == ["edge", "cloud"] and len(r["ways"]) >= 3
        assert all(w["answered"] == 15 for w in r["ways"].values())
        assert sum(r["choices"].values()) == 15
    best = {r["link"]: r["best"] for r in report["links"]}
    assert best["4g"] == "edge" and best["lan"] != "edge"  # 50 ms round trips vs 0.5 ms
    goals = {g.name: g for g in goals_of(report)}
    assert goals["every request answered"].passed
