"""The code's layout holds, as CI checks it: the import contracts in pyproject.toml (layers, no
cycles, policies import only ensemble.types, the gateway never imports the load-test harness)
and the unit-size budget of tools/unit_sizes.py."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_unit_outgrows_its_budget() -> None:
    sizes = runpy.run_path(str(ROOT / "tools" / "unit_sizes.py"))
    assert sizes["offenders"]() == []


def test_the_size_check_finds_a_long_function(tmp_path: Path) -> None:
    sizes = runpy.run_path(str(ROOT / "tools" / "unit_sizes.py"))
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "long.py").write_text(f"def long():\n{body}\n")
    found = sizes["offenders"](tmp_path)
    assert found == ["ensemble/long.py:1: long has 91 lines (at most 80 per function)"]
