"""README's Python examples run as written against a real gateway on the default config (its
addresses replaced by the test gateway's free ports), with the project's interpreter."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.integration.process import ROOT, GatewayProcess

EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_readme_has_the_http_and_grpc_examples() -> None:
    assert any("tritonclient.http" in e for e in EXAMPLES)
    assert any("tritonclient.grpc" in e for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: "grpc" if ".grpc" in e else "http")
def test_a_readme_example_runs_as_written(gateway: GatewayProcess, example: str) -> None:
    code = example.replace("127.0.0.1:8000", gateway.http_target).replace(
        "127.0.0.1:8001", gateway.grpc_target
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    labels, expected = first.split("expected")
    assert labels.strip() == expected.strip()  # four easy digits, all right
    assert "members_answered" in second and "policy" in second
