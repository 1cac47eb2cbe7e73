"""The policy registry: (kind, name) -> factory with a validated params model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict

Kind = Literal[
    "selection",
    "routing",
    "hedging",
    "retry",
    "outlier_detection",
    "aggregation",
    "admission",
    "autoscaling",
]
KINDS: tuple[str, ...] = get_args(Kind)
ENTRY_POINT_GROUP = "ensemble.policies"


class NoParams(BaseModel):
    """Params model of a policy that takes none; any key is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """A registered policy: how to build it and which params it accepts."""

    kind: str
    name: str
    factory: Callable[[Any], object]
    params_model: type[BaseModel]
    summary: str

    def build(self, params: Mapping[str, Any] | None = None) -> object:
        """Validate ``params`` (raises pydantic.ValidationError) and build the policy."""
        return self.factory(self.params_model.model_validate(dict(params or {})))


_REGISTRY: dict[tuple[str, str], PolicyEntry] = {}
_entry_points_loaded = False

F = TypeVar("F", bound=Callable[..., object])


def register(kind: Kind, name: str, params: type[BaseModel] = NoParams) -> Callable[[F], F]:
    """Class or function decorator: register ``factory(params_instance)`` as policy ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; kinds are {', '.join(KINDS)}")

    def decorate(factory: F) -> F:
        key = (kind, name)
        if key in _REGISTRY:
            raise ValueError(f"{kind} policy {name!r} is already registered")
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = PolicyEntry(kind, name, factory, params, doc[0] if doc else "")
        return factory

    return decorate


def _ensure_loaded() -> None:
    """Import the built-in policies and third-party ones from the entry-point group, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import policies.admission
    import policies.aggregation
    import policies.autoscaling
    import policies.autoscaling_r3e
    import policies.reliability
    import policies.routing
    import policies.selection
    import policies.selection_bandits
    import policies.selection_cocktail
    import policies.selection_slo  # noqa: F401

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def lookup(kind: Kind, name: str) -> PolicyEntry:
    """The entry for ``(kind, name)``; KeyError names the ones that exist."""
    _ensure_loaded()
    try:
        return _REGISTRY[(kind, name)]
    except KeyError:
        known = ", ".join(names(kind)) or "none"
        raise KeyError(f"unknown {kind} policy {name!r}; registered: {known}") from None


def names(kind: Kind) -> list[str]:
    """Registered policy names of one kind, sorted."""
    _ensure_loaded()
    return sorted(n for k, n in _REGISTRY if k == kind)


def build(kind: Kind, name: str, params: Mapping[str, Any] | None, protocol: type) -> Any:
    """Build a policy; TypeError unless it implements ``protocol`` (a runtime-checkable one)."""
    policy = lookup(kind, name).build(params)
    if not isinstance(policy, protocol):
        raise TypeError(f"{kind} policy {name!r} does not implement {protocol.__name__}")
    return policy
