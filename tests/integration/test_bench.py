"""`python -m loadtest.bench --smoke`: every peer starts, answers alike, is measured and stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_run_writes_a_complete_record(zoo_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "report.json").read_text())

    assert doc["command"].endswith(f"--smoke --out {tmp_path}")
    assert doc["machine"]["cpus"] >= 1
    assert doc["floor"]["members"] == ["logreg", "mlp_small", "forest"]
    assert 0 < doc["floor"]["p50_ms"] < 50
    closed = doc["closed_loop"]
    assert set(closed) == {"noop-http", "gateway-http", "gateway2w-http", "ray-http"}
    for system, levels in closed.items():
        assert set(levels) == {"1", "32"}, system
        for row in levels.values():
            assert row["rps"] > 0 and row["requests"] > 0, system
            assert 0 < row["p50_ms"] <= row["p99_ms"], system
            # The gateways' own batching, from their /metrics (a run serves one call or more).
            assert (row.get("calls_per_run", 0) >= 1) == system.startswith("gateway"), system
    assert set(doc["open_loop"]) == {"noop-http", "gateway-http", "ray-http"}
    assert doc["open_loop"]["gateway-http"]["100"]["offered_rps"] == 100

    ratios = doc["ratios"]
    assert ratios["concurrency"] == 32
    assert ratios["throughput_vs_ray_serve"] == pytest.approx(
        closed["gateway-http"]["32"]["rps"] / closed["ray-http"]["32"]["rps"], abs=0.01
    )
    assert ratios["throughput_vs_noop"] == pytest.approx(
        closed["gateway-http"]["32"]["rps"] / closed["noop-http"]["32"]["rps"], abs=0.001
    )
    assert doc["overhead_p50_ms_vs_floor"] == pytest.approx(
        closed["gateway-http"]["1"]["p50_ms"] - doc["floor"]["p50_ms"], abs=0.01
    )
    assert doc["generator_ceiling"]["wrk_http"]["rps"] > 0
    assert ratios["workers_speedup"] == pytest.approx(
        closed["gateway2w-http"]["32"]["rps"] / closed["gateway-http"]["32"]["rps"], abs=0.001
    )
    decided = [g["passed"] in (True, False) for g in doc["goals"]]
    assert decided == [True] * 7 + [False]  # a smoke run measures no gRPC
    assert doc["exit_codes"] == {"ray": 0, "gateway": 0, "gateway2w": 0, "noop": 0}
    assert "closed loop: req/s" in proc.stdout
    assert "closed loop: req/s" in (tmp_path / "report.md").read_text()
