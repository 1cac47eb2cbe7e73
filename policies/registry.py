"""The policy registry: (kind, name) -> factory with a validated params model.

A leaf: it imports no policy. Built-in and third-party policies register themselves when their
module is imported; ``policies.catalog`` knows which modules those are and is installed as the
registry's loader (by ``policies/__init__.py``), so the first look-up imports them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    "split",
]
KINDS: tuple[str, ...] = get_args(Kind)


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
_loader: Callable[[], None] | None = None
_loaded = False

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


def set_loader(loader: Callable[[], None]) -> None:
    """Install what imports the policies before the first look-up (``policies.catalog.load``).

    The registry cannot import the policy modules itself: each of them imports the registry.
    """
    global _loader, _loaded
    _loader, _loaded = loader, False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded or _loader is None:
        return
    # Set first: a policy module that looks a name up while it loads must not load again.
    _loaded = True
    _loader()


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
