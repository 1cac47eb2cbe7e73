"""`python -m loadtest.autoscale --quick` on the gateway with r3e: the step makes it grow, and
the report carries attainment, cost and the replica timeline (direction, never speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.process import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_step_grows_r3e_and_reports_it(zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--quiet", "--systems", "r3e", "--scenarios", "step", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.autoscale", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    assert run["system"] == "r3e" and run["scenario"] == "step"
    assert run["sent"] > 0 and 0 <= run["slo_attainment"] <= 1
    assert run["exit_code"] == 0
    step = run["step"]
    before = [sum(x.values()) for t, x in run["replicas"] if t < step["at_s"]]
    during = [sum(x.values()) for t, x in run["replicas"] if step["at_s"] <= t <= step["until_s"]]
    assert before and during
    # The edge placement's minimum is 1: the 5x step must take the member beyond it.
    assert max(during) > max(1, min(before)), run["replicas"]
    assert run["replica_seconds"]["edge"] > 0 and run["cost"] >= 0
    assert (out / "step.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "step" / "r3e" / "report.json").is_file()
    assert "autoscaler: logreg@" in (out / "step" / "r3e" / "gateway.log").read_text()
