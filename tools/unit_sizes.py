"""Fail when a unit grows past its budget: a module of `ensemble/` or `policies/` over 500 lines,
or a function anywhere outside the tests over 80 lines. Run by CI; prints every offender."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MODULE_PACKAGES = ("ensemble", "policies")
FUNCTION_PACKAGES = ("ensemble", "policies", "loadtest", "tools")


def offenders(root: Path = ROOT) -> list[str]:
    """Every unit over its budget under ``root``, one line each."""
    found = []
    for package in FUNCTION_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            where = path.relative_to(root)
            lines = text.count("\n")
            if package in MODULE_PACKAGES and lines > MAX_MODULE_LINES:
                found.append(f"{where}: {lines} lines (at most {MAX_MODULE_LINES} per module)")
            for node in ast.walk(ast.parse(text, str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(
                            f"{where}:{node.lineno}: {node.name} has {length} lines "
                            f"(at most {MAX_FUNCTION_LINES} per function)"
                        )
    return found


def main() -> int:
    found = offenders()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
