"""Loading and unloading models while serving (Triton's model repository extension).

A load or unload is the serving config with that model (or one of its versions) marked
loaded or not, applied as a hot reload: validated, built off the loop, swapped atomically (on
every worker or none), the old models drained before they close, so requests in flight finish
and no request is lost. What it changes lasts until the next reload from the config file.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from ensemble.config import GatewayConfig, MemberConfig
from ensemble.control.reload import ReloadResult
from ensemble.errors import InvalidInput, ModelNotFound, clip
from ensemble.types import MODEL_VERSION


class ModelLifecycle:
    """Loads and unloads the models of the config serving now."""

    def __init__(
        self,
        current: Callable[[], GatewayConfig],
        reload_text: Callable[[str], Awaitable[ReloadResult]],
    ) -> None:
        self._current = current
        self._reload_text = reload_text

    async def load(self, name: str, version: str | None = None) -> ReloadResult:
        """Serve ``name`` (all its versions, or ``version`` besides those it serves)."""
        return await self._apply(name, version, loaded=True)

    async def unload(self, name: str, version: str | None = None) -> ReloadResult:
        """Stop serving ``name`` (or only its ``version``) once requests on it finish."""
        return await self._apply(name, version, loaded=False)

    async def _apply(self, name: str, version: str | None, *, loaded: bool) -> ReloadResult:
        changed = with_loaded(self._current(), name, version, loaded=loaded)
        # Only what was set, as a config file would: defaults stay defaults.
        return await self._reload_text(
            json.dumps(changed.model_dump(mode="json", exclude_unset=True))
        )


def requested_version(parameters: object) -> str | None:
    """The version a load or unload request's parameters name (None: the whole model).
    Triton's `config` and `file:` overrides are refused: models come from the config."""
    if not isinstance(parameters, Mapping):
        raise InvalidInput("`parameters` must be a JSON object")
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise InvalidInput(
                f"parameter {clip(key)!r} is not supported: the gateway loads the models its "
                "config names (add them there and reload)"
            )
        if key not in ("version", "unload_dependents"):
            raise InvalidInput(
                f"unknown parameter {clip(key)!r}; known: version, unload_dependents"
            )
    version = parameters.get("version")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise InvalidInput('parameter `version` must be a version label such as "2"')
    return str(version)


def with_loaded(
    cfg: GatewayConfig, name: str, version: str | None, *, loaded: bool
) -> GatewayConfig:
    """``cfg`` with model ``name`` (or its ``version``) loaded or unloaded; a version's rollout
    or pinned default that no longer holds is dropped. ModelNotFound for an unknown name or
    version; InvalidInput for an unload that would leave a member without a version."""
    ensembles = []
    found = False
    for ens in cfg.ensembles:
        if ens.name == name:
            found = True
            if version not in (None, "", MODEL_VERSION):
                raise ModelNotFound(f"model {clip(name)!r} has no version {clip(version)!r}")
            ens = ens.model_copy(update={"loaded": loaded})
        members = []
        for member in ens.members:
            if member.name == name:
                found = True
                member = _member_loaded(member, version or None, loaded=loaded)
            members.append(member)
        ensembles.append(ens.model_copy(update={"members": members}))
    if not found:
        raise ModelNotFound(f"unknown model {clip(name)!r}; the config has no such model")
    return cfg.model_copy(update={"ensembles": ensembles})


def _member_loaded(member: MemberConfig, version: str | None, *, loaded: bool) -> MemberConfig:
    if version is None:
        update: dict[str, object] = {"loaded": loaded}
        if loaded:
            update["loaded_versions"] = None
        return _consistent(member.model_copy(update=update))
    labels = [member.version, *(v.version for v in member.versions)]
    if version not in labels:
        raise ModelNotFound(
            f"model {clip(member.name)!r} has no version {clip(version)!r}; versions: "
            f"{', '.join(labels)}"
        )
    served = set(member.served_versions())
    served = served | {version} if loaded else served - {version}
    if not served:
        raise InvalidInput(
            f"version {version} is the last one of {member.name!r} loaded; unload the model "
            "itself instead"
        )
    keep = None if served == set(labels) else sorted(served, key=int)
    return _consistent(member.model_copy(update={"loaded": True, "loaded_versions": keep}))


def _consistent(member: MemberConfig) -> MemberConfig:
    """Drop a pinned default version or a rollout that the versions served no longer allow
    (an unloaded member keeps both for when it is loaded again)."""
    if not member.loaded:
        return member
    served = member.served_versions()
    update: dict[str, object] = {}
    if member.default_version is not None and member.default_version not in served:
        update["default_version"] = None
    rollout = member.rollout
    if rollout is not None and (rollout.version not in served or len(served) < 2):
        update["rollout"] = None
    return member.model_copy(update=update) if update else member
