"""Building registered policies for the conformance suites, and the checks every entry passes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from policies import registry
from policies.registry import Kind

MINIMAL_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("selection", "static"): {"members": ["m0", "m2", "m4"]},
}
"""Params for policies whose defaults do not validate (``static`` has no default member
list); every other policy runs with its defaults."""


def params_for(kind: Kind, name: str) -> dict[str, Any] | None:
    return MINIMAL_PARAMS.get((kind, name))


def build(kind: Kind, name: str, protocol: type) -> Any:
    """The policy built with its defaults (or minimal params); TypeError unless a ``protocol``."""
    return registry.build(kind, name, params_for(kind, name), protocol)


def check_entry(kind: Kind, name: str) -> None:
    """A summary line, a params model that rejects unknown keys, a description on every field."""
    entry = registry.lookup(kind, name)
    assert entry.kind == kind and entry.name == name
    assert entry.summary, f"{kind} policy {name} has no docstring summary"
    assert issubclass(entry.params_model, BaseModel)
    with pytest.raises(ValidationError, match="unexpected"):
        entry.build({**(params_for(kind, name) or {}), "unexpected": 1})
    for field_name, info in entry.params_model.model_fields.items():
        assert info.description, f"{kind} policy {name}: param {field_name} has no description"
