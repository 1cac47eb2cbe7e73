"""Config of placement tiers: their prices and the (optionally emulated) link to each."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ensemble.config.base import StrictModel

LossMode = Literal["timeout", "reset"]


class LinkConfig(StrictModel):
    """Network link from the gateway to a tier; emulated in userspace when ``emulate`` is on.

    With ``emulate`` off (the default, and the setting for production) the values only describe
    the link and no call pays for them. On, every call to a replica on the tier (health checks
    of remote replicas too) crosses the emulated link; the admin API can change it at runtime.
    """

    emulate: bool = Field(
        False,
        description="Emulate this link's behaviour in userspace (tests, demos; off in "
        "production, where the link is real).",
    )
    delay_ms: float = Field(
        0.0, ge=0, le=60_000, description="One-way added delay, ms (a call pays it twice)."
    )
    jitter_ms: float = Field(
        0.0,
        ge=0,
        le=60_000,
        description="Uniform jitter around delay per direction, ms (a total never goes below 0).",
    )
    loss: float = Field(0.0, ge=0, lt=1, description="Probability a call is dropped.")
    loss_mode: LossMode = Field(
        "timeout",
        description="How a dropped call fails: `timeout` (no answer: it fails after "
        "`drop_timeout_ms`, or the call's own timeout when shorter) or `reset` (the connection "
        "is reset: it fails after one one-way delay).",
    )
    drop_timeout_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="How long a dropped call waits before it fails (a connect timeout), ms.",
    )
    bandwidth_mbps: float | None = Field(
        None,
        gt=0,
        description="Bandwidth cap in megabits per second (each call's request and response "
        "take their size over it; calls do not share it); none means uncapped.",
    )
    partitioned: bool = Field(
        False,
        description="The tier is cut off: calls fail at once and health checks fail, until "
        "the admin API heals it (`PUT /admin/links/{tier}`).",
    )
    seed: int = Field(0, description="Seed of jitter and loss (repeatable runs).")


class TierConfig(StrictModel):
    """A placement tier such as edge or cloud: its link and its prices."""

    link: LinkConfig = Field(default_factory=LinkConfig, description="Link to this tier.")
    cost_per_replica_hour: float = Field(
        0.0, ge=0, description="Price of one replica for one hour, in the config's currency."
    )
    cost_per_request: float = Field(0.0, ge=0, description="Price of one member call on this tier.")
    max_replicas: int | None = Field(
        None, ge=1, description="Upper bound on replicas across all members on this tier."
    )
    compute_slowdown: float = Field(
        1.0,
        ge=1,
        le=10_000,
        description="Emulation: a call on this tier's in-process and process replicas takes "
        "this many times as long as on the gateway's machine (an edge device slower than "
        "the host it is emulated on); 1: off. For experiments, like link emulation.",
    )
