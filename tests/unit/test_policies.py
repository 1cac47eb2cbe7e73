"""The policy registry and catalog: registration, look-up, and loading the policies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytest

from policies import catalog, registry


def test_duplicate_registration_rejected() -> None:
    assert registry.lookup("selection", "all").name == "all"  # the built-ins are loaded
    with pytest.raises(ValueError, match="already registered"):
        registry.register("selection", "all")(object)


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(KeyError, match=r"registered: .*all"):
        registry.lookup("selection", "nope")


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError, match="unknown policy kind 'nope'"):
        registry.register("nope", "x")  # type: ignore[arg-type]


@runtime_checkable
class _Quacks(Protocol):
    def quack(self) -> str: ...


def test_build_checks_the_protocol() -> None:
    with pytest.raises(TypeError, match="does not implement _Quacks"):
        registry.build("retry", "none", None, _Quacks)


def test_a_fresh_interpreter_sees_the_builtins_through_the_registry_alone() -> None:
    """Callers import ``policies.registry`` (or a policy module) and nothing else."""
    code = (
        "from policies import registry\n"
        "print(registry.names('retry'), registry.names('outlier_detection'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "['budget', 'none'] ['consecutive_failures', 'none']"


def test_catalog_loads_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    class FakeEntryPoint:
        name = "third_party"

        def load(self) -> Any:
            loaded.append(self.name)
            return None

    groups: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return [FakeEntryPoint()]

    monkeypatch.setattr(catalog, "entry_points", entry_points)
    catalog.load()
    assert groups == [catalog.ENTRY_POINT_GROUP] == ["ensemble.policies"]
    assert loaded == ["third_party"]


def test_registry_loads_once_through_its_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(registry, "_loader", lambda: calls.append(1))
    monkeypatch.setattr(registry, "_loaded", False)
    assert registry.names("retry") == ["budget", "none"]
    registry.lookup("retry", "none")
    assert calls == [1]


def test_registry_is_a_leaf() -> None:
    """Every policy module imports the registry, so the registry imports none of them (the
    import contracts in pyproject.toml keep the rest of the package free of cycles)."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("policies", "ensemble")}, imported
