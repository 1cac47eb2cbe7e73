"""`ensemble profile` end to end: a real run on a config with an emulated cloud link and a
remote (oip-http) placement, its files and the sanity of its numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ensemble.measure.report import read_csv
from ensemble.measure.rows import ProfileRow, dominates
from tests.integration.process import ROOT, ZOO, start_replica, zoo_member

DELAY_MS = 10.0


def run_profile(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensemble.cli", "profile", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_row(d: dict[str, str]) -> ProfileRow:
    r = ProfileRow(d["member"], d["tier"], d["backend"], d["placed"] == "1", 1, d["link"], None, "")
    r.accuracy, r.p50_ms = float(d["accuracy"]), float(d["p50_ms"])
    return r


@pytest.mark.slow
def test_profile_measures_each_tier_through_its_link(zoo_dir: Path, tmp_path: Path) -> None:
    replica = start_replica(ZOO / "logreg.onnx", tmp_path / "replica.log")
    try:
        doc = {
            "model_zoo": {"dir": str(ZOO)},
            "tiers": {
                "edge": {},
                "cloud": {
                    "link": {"emulate": True, "delay_ms": DELAY_MS},
                    "cost_per_request": 0.00001,
                    "cost_per_replica_hour": 0.36,
                },
            },
            "ensembles": [
                {
                    "name": "digits",
                    "members": [
                        zoo_member("logreg", {"tier": "edge"}, {"tier": "cloud"}),
                        zoo_member("mlp_small", {"tier": "cloud"}),
                        {  # logreg again, served by `ensemble replica` behind the link
                            "name": "remote_logreg",
                            "model": str(ZOO / "logreg.onnx"),
                            "placement": [
                                {
                                    "tier": "cloud",
                                    "backend": "oip-http",
                                    "endpoints": [replica.http_url],
                                    "remote_model": "logreg",
                                }
                            ],
                        },
                    ],
                }
            ],
        }
        config = tmp_path / "profile.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        out = tmp_path / "out"
        done = run_profile(str(config), "--quick", "--all-tiers", "--out", str(out))
    finally:
        assert replica.stop() == 0
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "logreg@cloud" in done.stderr  # progress on stderr
    assert done.stdout.splitlines()[0].split()[:2] == ["member", "tier"]
    for name in ("profile.csv", "profile.md", "profile.png"):
        assert (out / name).stat().st_size > 0

    rows = read_csv(out / "profile.csv")
    cells = {(r["member"], r["tier"], r["backend"]): r for r in rows}
    assert set(cells) == {
        ("logreg", "edge", "inprocess"),
        ("logreg", "cloud", "inprocess"),
        ("mlp_small", "cloud", "inprocess"),
        ("mlp_small", "edge", "inprocess"),  # --all-tiers: a what-if row
        ("remote_logreg", "cloud", "oip-http"),
        ("remote_logreg", "edge", "inprocess"),
    }
    assert cells["mlp_small", "edge", "inprocess"]["placed"] == "0"
    for r in rows:
        assert r["accuracy_source"].startswith("test"), r
        assert 0.8 < float(r["accuracy"]) <= 1.0, r
        p50, p99 = float(r["p50_ms"]), float(r["p99_ms"])
        assert p99 >= p50 > 0, r
        assert float(r["throughput_rps"]) > 0 and int(r["calls"]) == 40, r
        assert float(r["cost_per_1k"]) >= (0.01 if r["tier"] == "cloud" else 0.0), r
        if r["tier"] == "cloud":  # a call pays the one-way delay twice
            assert p50 >= 2 * DELAY_MS, r
            assert r["link"] == f"{DELAY_MS:g}ms"
        else:
            assert p50 < 2 * DELAY_MS, r
        if r["backend"] == "inprocess":
            assert r["rss_mb"] != "", r
    # The remote member is the same model as logreg: the same answers on the test split.
    assert (
        cells["remote_logreg", "cloud", "oip-http"]["accuracy"]
        == (cells["logreg", "edge", "inprocess"]["accuracy"])
    )
    parsed = [as_row(r) for r in rows]
    front = [p for p, r in zip(parsed, rows, strict=True) if r["pareto"] == "1"]
    assert front
    for p, r in zip(parsed, rows, strict=True):
        if r["pareto"] == "0":
            assert any(dominates(f, p) for f in front), r
        else:
            assert not any(dominates(q, p) for q in parsed), r


@pytest.mark.slow
def test_profile_prints_a_split_members_table(zoo_dir: Path, tmp_path: Path) -> None:
    doc = {
        "model_zoo": {"dir": str(ZOO)},
        "tiers": {
            "edge": {"compute_slowdown": 100},
            "cloud": {"link": {"emulate": True, "delay_ms": 25, "jitter_ms": 0}},
        },
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    {
                        **zoo_member("mlp_deep", {"tier": "edge"}, {"tier": "cloud"}),
                        "split": {},
                    }
                ],
            }
        ],
    }
    config = tmp_path / "split.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = run_profile(str(config), "--quick", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("split members")[1].splitlines()[1:]
    assert table[0].split()[:4] == ["member", "split", "head", "ms"]
    rows = {line.split()[1]: line.split() for line in table[2:] if line.startswith("mlp_deep")}
    assert list(rows)[:2] == ["edge", "cloud"] and len(rows) >= 3
    chosen = [name for name, cells in rows.items() if cells[-1] == "*"]
    assert chosen == ["edge"]  # 25 ms each way: the slow edge still beats the far cloud
    assert rows["edge"][4] == "0" and rows["cloud"][4] == "256"  # bytes sent a row
    csv = {r["tier"]: r for r in read_csv(tmp_path / "out" / "profile.csv")}
    assert set(csv) == {f"split:{name}" for name in rows}
    assert float(csv["split:cloud"]["p50_ms"]) >= 50  # two legs of 25 ms
    accuracies = {r["accuracy"] for r in csv.values()}
    assert len(accuracies) == 1  # every way answers as the whole model


def test_profile_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ensembles: []\n")
    done = run_profile(str(config), "--quick", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "invalid config" in done.stderr
    assert not (tmp_path / "out").exists()
    done = run_profile("configs/default.yaml", "--requests", "0")
    assert done.returncode == 2 and "--requests" in done.stderr
