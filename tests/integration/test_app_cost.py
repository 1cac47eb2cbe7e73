"""`python -m loadtest.app_cost`: the gateway's own CPU per request, measured in process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ensemble
from ensemble.auth import API_KEYS_ENV
from loadtest import app_cost


@pytest.mark.integration
def test_prints_cpu_per_request_over_the_rounds(
    zoo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = app_cost.main(["--requests", "64", "--rounds", "3", "--concurrency", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    found = re.search(r"of digits over 3 rounds of 64 at concurrency 8: "
                      r"min ([\d.]+), p25 ([\d.]+), median ([\d.]+)", out)  # fmt: skip
    assert found, out
    low, quarter, median = (float(x) for x in found.groups())
    assert 0 < low <= quarter <= median < 100_000  # microseconds: a request is never 0.1 s
    assert f"gateway code: {Path(ensemble.__file__).parent.parent}" in out  # the tree measured


@pytest.mark.integration
def test_a_failing_request_fails_the_run(
    zoo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(API_KEYS_ENV, "a-key-the-requests-do-not-send")
    assert app_cost.main(["--requests", "8", "--rounds", "1", "--concurrency", "2"]) == 1
    assert "requests failed: statuses {401: 8}" in capsys.readouterr().err


@pytest.mark.integration
def test_measures_a_member_addressed_directly(
    zoo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "logreg", "--requests", "16", "--rounds", "1", "--concurrency", "2"]
    assert app_cost.main(argv) == 0
    assert "CPU per request (us) of logreg over 1 rounds" in capsys.readouterr().out
    assert app_cost.main([*argv[:1], "nobody", *argv[2:]]) == 1
    assert "requests failed: statuses {404: 16}" in capsys.readouterr().err
