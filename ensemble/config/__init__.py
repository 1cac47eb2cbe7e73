"""The gateway's YAML config: pydantic models, loading, cross-checks and schema export.

One module per concern; this package re-exports what the rest of the gateway imports, so callers
write ``from ensemble.config import GatewayConfig, load_config``.
"""

from __future__ import annotations

from ensemble.config.base import NAME_PATTERN, Name, Sha256Hex, StrictModel
from ensemble.config.gateway import (
    GatewayConfig,
    json_schema,
    load_config,
    parse_config,
    parse_yaml,
)
from ensemble.config.members import (
    DriftConfig,
    EnsembleConfig,
    MemberConfig,
    ModelZooConfig,
    RolloutConfig,
    SplitConfig,
    VersionConfig,
)
from ensemble.config.placement import (
    REMOTE_BACKENDS,
    Backend,
    DeviceConfig,
    FailureConfig,
    Placement,
    ProcessReplicaConfig,
    RayDeploymentConfig,
    ReplicaBounds,
    StragglerConfig,
)
from ensemble.config.policies import (
    AutoscalingConfig,
    PolicySpec,
    ProfileConfig,
    UncertaintyConfig,
)
from ensemble.config.server import RayConfig, ServerConfig, TlsConfig, TracingConfig
from ensemble.config.tiers import LinkConfig, LossMode, TierConfig

__all__ = [
    "NAME_PATTERN",
    "REMOTE_BACKENDS",
    "AutoscalingConfig",
    "Backend",
    "DeviceConfig",
    "DriftConfig",
    "EnsembleConfig",
    "FailureConfig",
    "GatewayConfig",
    "LinkConfig",
    "LossMode",
    "MemberConfig",
    "ModelZooConfig",
    "Name",
    "Placement",
    "PolicySpec",
    "ProcessReplicaConfig",
    "ProfileConfig",
    "RayConfig",
    "RayDeploymentConfig",
    "ReplicaBounds",
    "RolloutConfig",
    "ServerConfig",
    "Sha256Hex",
    "SplitConfig",
    "StragglerConfig",
    "StrictModel",
    "TierConfig",
    "TlsConfig",
    "TracingConfig",
    "UncertaintyConfig",
    "VersionConfig",
    "json_schema",
    "load_config",
    "parse_config",
    "parse_yaml",
]
