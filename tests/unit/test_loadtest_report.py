"""Reports from synthetic records: statistics, SLO verdicts, timeline, warnings, files, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.faults import Mark
from loadtest.plots import write_plots
from loadtest.report import RunInfo, build_report, render_markdown, write_report
from loadtest.runner import GeneratorResult, Records
from loadtest.scenario import Scenario, parse_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scenario(slo: dict[str, Any], **extra: Any) -> Scenario:
    doc = {
        "target": {"url": "http://127.0.0.1:1"},
        "load": {"shape": "constant", "rps": 100, "duration_s": 2},
        "mix": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
        "slo": slo,
        **extra,
    }
    return parse_scenario(doc)


def info(harness: bool = False, code: int | None = None) -> RunInfo:
    marks = [Mark(1.0, "log", "halfway")]
    return RunInfo("t", "t.yaml", "2026-01-01T00:00:00", "http://127.0.0.1:1", None, harness,
                   code, marks)  # fmt: skip


def records(n: int = 200, lag: float = 0.0) -> Records:
    """n requests over 2 s: latency 1..n ms, every 10th wrong, every 50th a 503."""
    rec = Records()
    for i in range(n):
        t = i * 2 / n
        if i % 50 == 49:
            rec.add(t, lag, 0.001, rec.code("http_503"), i % 2, 0)
        else:
            rec.add(t, lag, (i + 1) / 1000, 0, i % 2, 0 if i % 10 == 0 else 1)
    return rec


def result(rec: Records, cpu_s: float = 0.1, queued: int = 0) -> GeneratorResult:
    return GeneratorResult(rec, {"http_503": "model not ready"}, queued, cpu_s, 2.0)


def test_statistics() -> None:
    report = build_report(scenario({}), result(records()), info())
    assert report["requests"] == {"sent": 200, "answered": 196, "degraded": 0, "errors": 4}
    assert report["errors"] == {"http_503": 4}
    assert report["error_samples"] == {"http_503": "model not ready"}
    assert report["error_rate"] == pytest.approx(0.02)
    assert report["throughput_rps"] == pytest.approx(98.0)
    assert report["accuracy"] == pytest.approx(176 / 196, abs=1e-6)
    lat = report["latency_ms"]
    assert lat["max"] == 199.0 and 95 <= lat["p50"] <= 105 and 190 <= lat["p99"] <= 199
    assert [c["requests"] for c in report["classes"]] == [100, 100]
    assert report["goodput_rps"] == pytest.approx(176 / 2)  # no latency budget: correct answers
    json.dumps(report)  # JSON-able as it is


def test_slo_checks_pass_and_fail() -> None:
    slo = {"latency_ms": {"p50": 150, "p99": 150}, "max_error_rate": 0.05, "min_accuracy": 0.95,
           "min_goodput_rps": 10}  # fmt: skip
    report = build_report(scenario(slo), result(records()), info(harness=True, code=0))
    verdicts = {c["name"]: c["passed"] for c in report["slo"]["checks"]}
    assert verdicts == {
        "latency p50": True,
        "latency p99": False,
        "error rate": True,
        "accuracy": False,
        "goodput": True,
        "gateway exit code after SIGTERM": True,
    }
    assert report["slo"]["passed"] is False
    # Goodput counts correct answers within the largest latency target (150 ms).
    assert report["goodput_rps"] < 176 / 2
    check = report["slo"]["checks"][1]
    assert set(check) >= {"name", "target", "actual", "passed"}


def test_gateway_exit_code_is_a_check() -> None:
    report = build_report(scenario({}), result(records()), info(harness=True, code=1))
    assert report["slo"]["passed"] is False
    assert report["slo"]["checks"][-1]["actual"] == 1


def test_timeline_per_second() -> None:
    report = build_report(scenario({}), result(records()), info())
    rows = report["timeline"]
    assert [r["t"] for r in rows] == [0, 1, 2]
    assert sum(r["sent"] for r in rows) == 200
    assert sum(r["answered"] + r["errors"] for r in rows) == 200
    assert rows[0]["latency_ms"]["p50"] is not None and rows[0]["accuracy"] is not None


def test_saturated_generator_is_flagged() -> None:
    calm = build_report(scenario({}), result(records(lag=0.001)), info())
    assert calm["generator"]["generator_saturated"] is False
    late = build_report(scenario({}), result(records(lag=0.05), cpu_s=1.9), info())
    assert late["generator"]["generator_saturated"] is True
    assert late["generator"]["send_lag_ms"]["p99"] == pytest.approx(50.0)
    assert any("generator saturated" in w and "CPU-bound" in w for w in late["warnings"])
    waits = build_report(scenario({}), result(records(), queued=50), info())
    assert any("waited for a free HTTP connection" in w for w in waits["warnings"])


def test_empty_run() -> None:
    report = build_report(scenario({"latency_ms": {"p99": 5}}), result(Records()), info())
    assert report["requests"]["sent"] == 0 and report["timeline"] == []
    assert report["slo"]["passed"] is False  # nothing measured cannot pass a latency target
    assert "no requests were sent" in report["warnings"]


def test_files_and_plots(tmp_path: Path) -> None:
    slo = {"latency_ms": {"p99": 150}, "min_accuracy": 0.5}
    report = build_report(scenario(slo, description="demo"), result(records()), info())
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["slo"]["passed"] is False
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Load test `t`: FAILED") and "| latency p99 | <= 150 ms |" in md
    assert "**FAIL**" in md and "halfway" in md and "demo" in md
    for path in write_plots(report, tmp_path):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_markdown_without_checks() -> None:
    report = build_report(scenario({}), result(records()), info())
    text = render_markdown(report)
    assert "PASSED" in text and "None defined." in text
