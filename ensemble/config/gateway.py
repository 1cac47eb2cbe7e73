"""The whole config file: its model, cross-field checks, loading and schema export."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from ensemble.config.base import Name, StrictModel
from ensemble.config.members import EnsembleConfig, MemberConfig, ModelZooConfig
from ensemble.config.placement import Placement
from ensemble.config.policies import AutoscalingConfig, PolicySpec, ProfileConfig
from ensemble.config.server import RayConfig, ServerConfig
from ensemble.config.tiers import TierConfig
from ensemble.config_errors import (
    Loc,
    LocatedError,
    did_you_mean,
    dotted,
    format_errors,
    line_index,
)
from ensemble.errors import ConfigError
from ensemble.model_checks import class_errors, input_errors
from ensemble.tls import client_tls_file_error, tls_file_errors
from policies import registry


def _default_tiers() -> dict[str, TierConfig]:
    return {"edge": TierConfig(), "cloud": TierConfig()}


class GatewayConfig(StrictModel):
    """The whole gateway config file."""

    server: ServerConfig = Field(default_factory=ServerConfig, description="Frontends, limits.")
    tiers: dict[Name, TierConfig] = Field(
        default_factory=_default_tiers, description="Placement tiers by name."
    )
    ensembles: list[EnsembleConfig] = Field(min_length=1, description="Ensembles to serve.")
    policies: dict[Name, ProfileConfig] = Field(
        default_factory=dict, description="Policy profiles; `default` exists unless redefined."
    )
    model_zoo: ModelZooConfig = Field(
        default_factory=ModelZooConfig, description="The built-in model zoo."
    )
    outlier_detection: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="consecutive_failures"),
        description="Ejecting failing replicas from routing, per replica, with half-open "
        "probing (`consecutive_failures`; `none`). A member's last usable replicas are "
        "never all ejected.",
    )
    admission: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="adaptive"),
        description="Admission control before any work on a request (`adaptive`, the "
        "default: at most a limit of requests run at once, the limit following measured "
        "service time, as many wait, the least important shed with 429 / RESOURCE_EXHAUSTED "
        "and Retry-After; `bounded`: the same with fixed `max_running` and `max_waiting`).",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="The control loop (off when absent): it observes every placement, decides "
        "target replicas with the policy within `replicas` bounds, scales in-process and "
        "process placements (drained before removal) and ray placements (Serve replica "
        "counts), observes remote ones, and logs and exports every decision.",
    )
    ray: RayConfig = Field(
        default_factory=RayConfig, description="Ray, for members placed on the `ray` backend."
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from (None when built from data)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Directory relative paths in this config are resolved against."""
        return self._base_dir

    def resolve(self, path: Path) -> Path:
        """``path`` made absolute against the config file's directory."""
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def profile(self, name: str) -> ProfileConfig:
        """The named policy profile (``default`` is built in)."""
        if name in self.policies:
            return self.policies[name]
        if name == "default":
            return ProfileConfig()
        raise KeyError(name)

    def uses_ray(self) -> bool:
        """Some member has a placement on the `ray` backend."""
        return any(
            place.backend == "ray"
            for ens in self.ensembles
            for member in ens.members
            for place in member.placement
        )

    def member_specs(self) -> Iterator[tuple[Loc, MemberConfig]]:
        """Every member at each of its versions (its own model, card, pin and placement),
        with where that version is written."""
        for ei, ens in enumerate(self.ensembles):
            for mi, member in enumerate(ens.members):
                loc: Loc = ("ensembles", ei, "members", mi)
                yield loc, member.at_version(member.version)
                for vi, version in enumerate(member.versions):
                    at: Loc = (*loc, "versions", vi)
                    yield at, member.at_version(version.version)

    def model_names(self) -> list[str]:
        """Every name a client can address: ensembles, then members."""
        return [e.name for e in self.ensembles] + [
            m.name for e in self.ensembles for m in e.members
        ]

    def zoo_dir(self) -> Path:
        return self.resolve(self.model_zoo.dir)


def _semantic_errors(cfg: GatewayConfig) -> list[LocatedError]:
    """Cross-field problems pydantic cannot see: references, uniqueness, policy params, files."""
    errors: list[LocatedError] = []
    seen: dict[str, Loc] = {}
    for ei, ens in enumerate(cfg.ensembles):
        for loc, name in [(("ensembles", ei, "name"), ens.name)] + [
            (("ensembles", ei, "members", mi, "name"), m.name) for mi, m in enumerate(ens.members)
        ]:
            if name in seen:
                errors.append((loc, f"model name {name!r} is already used at {dotted(seen[name])}"))
            else:
                seen[name] = loc
        if ens.policy not in cfg.policies and ens.policy != "default":
            known = ", ".join(sorted({*cfg.policies, "default"}))
            errors.append(
                (("ensembles", ei, "policy"), f"unknown profile {ens.policy!r}; defined: {known}")
            )
        if ens.loaded and not any(m.loaded for m in ens.members):
            errors.append(
                (
                    ("ensembles", ei, "members"),
                    "no member is loaded; load one or set the ensemble's loaded: false",
                )
            )
    for where, version in cfg.member_specs():
        errors.extend(_member_errors(cfg, version, where))
    errors.extend(input_errors(cfg))  # what `serve` would refuse, with the member's line
    errors.extend(class_errors(cfg))
    gateway_tier = cfg.ray.gateway_tier
    if gateway_tier is not None and gateway_tier not in cfg.tiers:
        known = ", ".join(sorted(cfg.tiers)) or "none"
        errors.append((("ray", "gateway_tier"), f"unknown tier {gateway_tier!r}; defined: {known}"))
    members = {m.name for ens in cfg.ensembles for m in ens.members}
    for pname, profile in cfg.policies.items():
        for kind in ("selection", "aggregation", "routing", "hedging", "retry"):
            spec: PolicySpec = getattr(profile, kind)
            errors.extend(_policy_errors(kind, spec, ("policies", pname, kind)))
        if profile.fallback is not None and profile.fallback not in members:
            errors.append(
                (
                    ("policies", pname, "fallback"),
                    f"unknown member {profile.fallback!r}{did_you_mean(profile.fallback, members)}",
                )
            )
    errors.extend(_policy_errors("admission", cfg.admission, ("admission",)))
    if cfg.autoscaling is not None:
        spec = cfg.autoscaling.policy
        errors.extend(_policy_errors("autoscaling", spec, ("autoscaling", "policy")))
    errors.extend(
        _policy_errors("outlier_detection", cfg.outlier_detection, ("outlier_detection",))
    )
    if cfg.server.tls is not None:
        tls = cfg.server.tls.resolved(cfg.base_dir)
        errors.extend(
            (("server", "tls", problem.field), problem.message)
            for problem in tls_file_errors(tls.cert_file, tls.key_file, tls.client_ca_file)
        )
    return errors


def _member_errors(cfg: GatewayConfig, member: MemberConfig, loc: Loc) -> list[LocatedError]:
    """A member's (or one version's) placements and model file."""
    errors: list[LocatedError] = []
    endpoints: dict[str, int] = {}
    for pi, place in enumerate(member.placement):
        for endpoint in place.endpoints or ():
            if endpoints.setdefault(endpoint, pi) != pi:
                errors.append(
                    (
                        (*loc, "placement", pi, "endpoints"),
                        f"endpoint {endpoint!r} is already a replica of this member "
                        f"(placement[{endpoints[endpoint]}])",
                    )
                )
        if place.tier not in cfg.tiers:
            known = ", ".join(sorted(cfg.tiers)) or "none"
            errors.append(
                ((*loc, "placement", pi, "tier"), f"unknown tier {place.tier!r}; defined: {known}")
            )
        errors.extend(_credential_errors(cfg, place, (*loc, "placement", pi)))
    errors.extend(_file_errors(cfg, member, loc))
    if member.split is not None:
        errors.extend(_policy_errors("split", member.split.policy, (*loc, "split", "policy")))
    return errors


def _credential_errors(cfg: GatewayConfig, place: Placement, loc: Loc) -> list[LocatedError]:
    """A remote placement's TLS files that do not load, an API key's variable that is unset."""
    errors: list[LocatedError] = []
    tls = place.tls
    if tls is not None:
        ca, cert, key = (
            None if p is None else cfg.resolve(p)
            for p in (tls.ca_file, tls.cert_file, tls.key_file)
        )
        problem = client_tls_file_error(ca, cert, key)
        if problem is not None:
            errors.append(((*loc, "tls", problem.field), problem.message))
    name = place.api_key_env
    if name is not None and not os.environ.get(name):
        errors.append(((*loc, "api_key_env"), f"environment variable {name} is not set"))
    return errors


def _file_errors(cfg: GatewayConfig, member: MemberConfig, loc: Loc) -> list[LocatedError]:
    path = cfg.resolve(member.model)
    if path.is_file():
        return []
    zoo = cfg.zoo_dir()
    if cfg.model_zoo.build_if_missing and path.parent == zoo:
        return []  # `serve` builds the zoo on first use
    return [((*loc, "model"), f"model file not found: {path}")]


def _policy_errors(kind: str, spec: PolicySpec, loc: Loc) -> list[LocatedError]:
    try:
        entry = registry.lookup(kind, spec.name)  # type: ignore[arg-type]
    except KeyError as exc:
        return [((*loc, "name"), str(exc.args[0]))]
    try:
        entry.params_model.model_validate(spec.params)
    except ValidationError as exc:
        return [((*loc, "params", *e["loc"]), e["msg"]) for e in exc.errors()]
    return []


def parse_config(
    data: Any, *, source: str = "<config>", base_dir: Path | None = None
) -> GatewayConfig:
    """Validate a decoded YAML document; raises ConfigError listing every problem."""
    return _parse(data, source=source, base_dir=base_dir, text=None)


def _parse(data: Any, *, source: str, base_dir: Path | None, text: str | None) -> GatewayConfig:
    lines = line_index(text) if text is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: the document must be a mapping of sections"])
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(source, exc, lines, GatewayConfig)) from None
    cfg._base_dir = (base_dir or Path.cwd()).resolve()
    problems = _semantic_errors(cfg)
    if problems:
        raise ConfigError(source, format_errors(source, problems, lines))
    return cfg


def parse_yaml(text: str, *, source: str, base_dir: Path) -> GatewayConfig:
    """Parse and fully validate YAML text; errors carry ``source:line:col`` and the YAML path."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(source, [f"{where}: invalid YAML: {exc}"]) from None
    return _parse(data, source=source, base_dir=base_dir, text=text)


def load_config(path: str | Path) -> GatewayConfig:
    """Read, parse and fully validate a YAML config file; raises ConfigError."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(source, [f"{source}: cannot read: {reason or exc}"]) from None
    cfg = parse_yaml(text, source=source, base_dir=path.parent)
    cfg._source = path.resolve()
    return cfg


def json_schema() -> dict[str, Any]:
    """The JSON schema of the config file (what `configs/schema.json` holds)."""
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ensemble gateway configuration"
    return schema
