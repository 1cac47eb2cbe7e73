"""The Triton server's own virtual environment, `.venv-triton` at the repository's root.

Triton comes from the `nvidia-pytriton` wheel, which needs numpy<2, so it cannot share the
project's environment; onnxruntime runs the served model. The environment is made once and
reused (a marker file says the install finished); `.ci/run` makes it before the tests:

    python3 tests/triton/venv.py        # prints the environment's interpreter
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-triton"
PACKAGES = ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime")
MARKER = VENV / ".installed"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure(venv: Path = VENV, quiet: bool = False) -> Path:
    """The environment's interpreter, after making the environment if it is not there yet.

    Raises ``RuntimeError`` (with pip's output) when it cannot be made, e.g. with no network.
    """
    marker = venv / MARKER.name
    wanted = "\n".join(PACKAGES)
    interpreter = venv / "bin" / "python"
    if marker.exists() and marker.read_text() == wanted and interpreter.exists():
        return interpreter

    def say(message: str) -> None:
        if not quiet:
            print(f"[triton venv] {message}", flush=True)

    start = time.monotonic()
    say(f"creating {venv}")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(interpreter), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(interpreter), "-m", "pip", "install", "--quiet", "--progress-bar", "off", *PACKAGES],
        [str(interpreter), "-c", "import pytriton.triton, onnxruntime, numpy"],
    ]
    for step in steps:
        say(" ".join(step[2:] if step[0] == str(interpreter) else step[1:]))
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"could not make the Triton environment {venv} (`{' '.join(step)}` exited "
                f"{done.returncode}):\n{done.stdout}{done.stderr}"
            )
    marker.write_text(wanted)
    say(f"ready in {time.monotonic() - start:.0f} s: {interpreter}")
    return interpreter


if __name__ == "__main__":
    try:
        print(ensure())
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
