"""How the load-test harness sits in the code: the gateway never imports it, its modules import
each other without cycles (imports inside functions count), and its functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (inside functions and
    TYPE_CHECKING blocks too, as grimp and import-linter count them)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import"
            base = node.module or ""
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_the_gateway_never_imports_the_harness() -> None:
    for package in ("ensemble", "policies"):
        for path in sorted((ROOT / package).rglob("*.py")):
            harness = {m for m in imported(path) if m == "loadtest" or m.startswith("loadtest.")}
            assert not harness, f"{path.relative_to(ROOT)} imports {sorted(harness)}"


def test_no_two_harness_modules_import_each_other() -> None:
    paths = sorted((ROOT / "loadtest").rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    graph = {name: {m for m in imported(p) if m in modules} - {name} for name, p in modules.items()}

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {name: reachable(name) for name in graph}
    cycles = sorted((a, b) for a in graph for b in reach[a] if a < b and a in reach[b])
    assert not cycles, cycles


def test_harness_functions_stay_short() -> None:
    long = []
    for path in sorted((ROOT / "loadtest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, long
