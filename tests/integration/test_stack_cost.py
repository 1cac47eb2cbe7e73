"""`python -m loadtest.stack_cost`: what the server stacks cost per call, on real servers."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest

from loadtest import stack_cost

ROW = re.compile(r"^((?:http|grpc) \(.*?\))\s+(\d+)\s+(\d+)\s+([\d.]+)$", re.MULTILINE)


@pytest.mark.integration
def test_measures_each_server_with_its_loop_kept_busy(
    zoo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--concurrency", "1", "--rounds", "1", "--duration", "1", "--grpc-procs", "1"]
    # A second server with an empty directory first on its path: the same grpcio, found anyway.
    argv += ["--handler-cpu-us", "2000", "--pythonpath", str(tmp_path)]
    assert stack_cost.main(argv) == 0
    rows = ROW.findall(capsys.readouterr().out)
    assert [r[0] for r in rows] == [
        "http (uvicorn, httptools)",
        "http (the gateway's protocol)",
        f"grpc (grpcio {grpc.__version__})",
        f"grpc (uvicorn, zttp {version('zttp')})",
        f"grpc (grpcio {grpc.__version__}, {tmp_path})",
    ]
    for _, level, calls_per_s, cpu_us in rows:
        assert level == "1"
        # At most one call at a time, each holding the loop 2 ms: under 500 calls/s, and each
        # costs the server at least half those 2 ms of CPU even on a crowded machine.
        assert 0 < int(calls_per_s) < 500
        assert 1000 < float(cpu_us) < 100_000


def test_refuses_levels_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        stack_cost.main(["--concurrency", "0"])
    assert exc.value.code == 2
    assert "--concurrency and --rounds must be at least 1" in capsys.readouterr().err
