"""Config naming policies: a policy spec, the profiles of policies, the autoscaling loop."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ensemble.config.base import StrictModel


class PolicySpec(StrictModel):
    """A named policy and its parameters, validated by the policy's own params model."""

    name: str = Field(description="Registered policy name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Policy parameters.")


class ProfileConfig(StrictModel):
    """An operator-defined policy profile: how an ensemble answers."""

    selection: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="all"), description="Which members answer."
    )
    aggregation: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="mean_probability"),
        description="How answers are combined.",
    )
    routing: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="round_robin"),
        description="Which replica of a member takes a call (p2c, peak_ewma, tier_preference...).",
    )
    hedging: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="none"),
        description="When to send a second copy of a slow call to another replica "
        "(`percentile`: after the replica's p95, within a budget of extra calls).",
    )
    retry: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="budget"),
        description="Retrying a failed member call on another replica or tier (`budget`: up to "
        "`max_attempts`, within a budget of extra calls; `none`).",
    )
    on_violation: Literal["reject", "degrade", "reroute", "alert"] = Field(
        "degrade",
        description="When the request's contract is not met (deadline, a member failing, "
        "min_accuracy, max_cost): `reject` answers with an error; `degrade` answers with what "
        "arrived (or the fallback member) and says so; `reroute` first asks the members not yet "
        "asked, then degrades; `alert` answers as is and logs a warning. Always counted.",
    )
    fallback: str | None = Field(
        None,
        description="A member (fast and cheap) asked when nothing else can answer in time: "
        "under `degrade` or `reroute`, started early enough to answer before the deadline.",
    )
    uncertainty: UncertaintyConfig | None = Field(
        None,
        description="Mark answers `uncertain` (and escalate them) by the ensemble's own "
        "disagreement and entropy and the input's distance from the training data; None: "
        "not checked (no per-request cost).",
    )


class UncertaintyConfig(StrictModel):
    """When a profile calls an answer uncertain, and what it does then. A threshold left out
    is not checked; an answer is uncertain when any row passes any threshold set."""

    entropy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Entropy of the combined probabilities, as a share of its maximum "
        "(log of the class count), above which a row is uncertain.",
    )
    disagreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of the answering members whose top class is not the combined "
        "answer's, above which a row is uncertain (needs two answers or more).",
    )
    input_outliers: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of a row's features outside the training range (from the member "
        "cards' `input_reference`), above which it is uncertain.",
    )
    escalate: bool = Field(
        True,
        description="Ask the members not asked yet (those the contract allows, on a tier "
        "that fits the time left) before answering an uncertain request.",
    )


class AutoscalingConfig(StrictModel):
    """The control loop: its interval, observation window and policy."""

    interval_s: float = Field(1.0, gt=0, le=3600, description="Seconds between decisions.")
    window_s: float = Field(
        10.0, gt=0, le=86_400, description="Load is averaged over this many seconds."
    )
    policy: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="r3e"),
        description="Autoscaling policy: `r3e` (edge first, burst to the cloud, N+1, scale "
        "bursts to zero, cost budget), `target_inflight` (Ray Serve's rule), `capacity` "
        "(INFaaS), `slo_feedback` (tail latency and error budget).",
    )
