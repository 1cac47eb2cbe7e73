"""Config of ensembles, their members, and the model zoo the members' files come from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ensemble.config.base import Name, Sha256Hex, StrictModel
from ensemble.config.placement import Placement


class MemberConfig(StrictModel):
    """One ensemble member: an ONNX classifier and where its replicas run."""

    name: Name = Field(description="Member name; also addressable as a model of its own.")
    model: Path = Field(description="ONNX file, relative to this config file's directory.")
    card: Path | None = Field(
        None, description="Member card JSON; default: `<model stem>.card.json` beside the model."
    )
    sha256: Sha256Hex | None = Field(
        None,
        description="Hex SHA-256 the model file must have; the gateway refuses a file that "
        "hashes otherwise (on start, reload and every new replica). Needed for a model without "
        "a member card; with a card, the file must match both.",
    )
    probability_output: str | None = Field(
        None, description="Output holding class scores; default: from the card, else inferred."
    )
    output_kind: Literal["probabilities", "logits"] = Field(
        "probabilities", description="`logits` outputs are turned into probabilities by softmax."
    )
    classes: list[int] | list[str] | None = Field(
        None,
        min_length=2,
        description="Class labels in output order; default: the card, the graph's classifier "
        "node, else 0..C-1.",
    )
    placement: list[Placement] = Field(min_length=1, description="Tiers this member runs on.")
    inputs: dict[str, str] | None = Field(
        None,
        description="The member's own input names, each with the ensemble input it takes "
        "(`{features: input}`: the model's `features` gets the ensemble's `input`, converted "
        "to the model's datatype); default: by position.",
    )
    class_map: dict[str, int | str] | None = Field(
        None,
        description="Each of the member's class labels (as written in YAML) with the ensemble "
        "class it stands for; ensemble classes no member label maps to get probability 0 from "
        "this member. Default: the member's labels are the ensemble's, in order.",
    )

    @model_validator(mode="after")
    def _somewhere_always(self) -> MemberConfig:
        # A placement may scale to zero (a burst tier) while another one keeps the member up.
        if all(p.replicas.min == 0 for p in self.placement):
            raise ValueError(
                "placement: every placement has replicas.min 0; keep at least one replica on "
                "some tier (a tier may scale to zero only while another one serves the member)"
            )
        return self

    def replica_names(self) -> list[list[str]]:
        """Per placement, its replicas' names ``TIER/INDEX``, numbered per tier across
        placements: one per endpoint (remote), one per deployment (ray; Ray Serve balances the
        deployment's own replicas, none while scaled to zero), else ``replicas.min`` (none on
        a tier that starts scaled to zero)."""
        counts: dict[str, int] = {}
        names = []
        for place in self.placement:
            if place.remote:
                n = len(place.endpoints or ())
            elif place.backend == "ray":
                n = 1
            else:
                n = place.replicas.min
            first = counts.get(place.tier, 0)
            counts[place.tier] = first + n
            names.append([f"{place.tier}/{i}" for i in range(first, first + n)])
        return names


class InputSpec(StrictModel):
    """One input tensor an ensemble takes."""

    name: str = Field(min_length=1, description="Tensor name clients send.")
    datatype: Literal["FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8"] = Field(
        description="OIP datatype clients send."
    )
    shape: list[int] = Field(
        min_length=1, description="Dimensions, the batch first; -1 for a variable one."
    )


class DriftConfig(StrictModel):
    """Watching the ensemble's inputs against the training distribution in its members' cards."""

    enabled: bool = Field(
        True,
        description="Score input drift when a member card has the input's training "
        "distribution (`input_reference`); off: no per-request cost.",
    )
    window: int = Field(
        500, ge=50, le=100_000, description="Rows per drift score (a tumbling window)."
    )
    threshold: float = Field(
        0.2,
        gt=0,
        le=10,
        description="Drift score (mean per-feature PSI) at which a warning is logged; below it "
        "again, an info line. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted.",
    )


class EnsembleConfig(StrictModel):
    """An ensemble served as one model."""

    name: Name = Field(description="Model name clients use.")
    description: str = Field("", description="Free text shown in model metadata.")
    policy: str = Field("default", description="Name of a profile under `policies`.")
    members: list[MemberConfig] = Field(min_length=1, description="The ensemble's members.")
    inputs: list[InputSpec] | None = Field(
        None,
        min_length=1,
        description="The ensemble's own inputs, which members map to (`members[].inputs`); "
        "default: the first member's.",
    )
    classes: list[int] | list[str] | None = Field(
        None,
        min_length=2,
        description="The ensemble's class labels, in the order of its `probabilities` output, "
        "which members map to (`members[].class_map`); default: the first member's.",
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig, description="Input drift watch (see docs/contracts.md)."
    )


class ModelZooConfig(StrictModel):
    """Where the built-in model zoo lives; `serve` builds it when member files are missing."""

    dir: Path = Field(Path("../models/digits"), description="Zoo directory, relative to config.")
    build_if_missing: bool = Field(True, description="Build the zoo on first use.")
