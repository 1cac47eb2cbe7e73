"""The abuse harness end to end on the quickstart's local config: the quick attacks run against
a real gateway, their goals are judged, and the report says what other clients saw."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest import abuse
from tests.integration.process import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_attacks_meet_their_goals(zoo_dir: Path, tmp_path: Path) -> None:
    environment = dict(os.environ)
    attacks = "feedback_forgery,reused_ids,long_strings,non_finite,model_swap"
    code = abuse.main(
        [str(ROOT / "configs" / "local.yaml"), "--attacks", attacks, "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["attack"]: row for row in report["attacks"]}
    assert dict(os.environ) == environment  # its tokens went to its gateway only
    assert code == 0, rows
    assert report["listening_off_loopback"] == []
    assert report["gateway_exit_code"] == 0
    forged = rows["feedback_forgery"]["outcome"]
    assert set(forged["answers"]) <= {"http_401", "http_403"} and not forged["weights_changed"]
    assert forged["weights"] > 0  # the learning profile exports weights: the check means something
    reused = rows["reused_ids"]["outcome"]
    assert reused["ids_echoed"] and reused["feedback_ids_distinct"]
    assert reused["bob_label"] == reused["alice_label"] == "http_200"
    assert rows["model_swap"]["outcome"]["reload"] == "http_400"
    assert rows["non_finite"]["outcome"]["availability_violations_added"] == 0
    for row in rows.values():  # the probe's clients were served throughout
        assert all(kind["errors"] == 0 for kind in row["others"].values()), row
    counted = report["rejections_counted"]
    assert any('reason="unauthenticated"' in key or 'reason="forbidden"' in key for key in counted)
    assert "| model_swap |" in (tmp_path / "report.md").read_text()
