"""Config of ensembles, their members, and the model zoo the members' files come from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ensemble.config.base import Name, Sha256Hex, StrictModel
from ensemble.config.placement import Placement
from ensemble.config.policies import PolicySpec

VersionLabel = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,8}$")]
"""A model version: a positive integer, written as a string (OIP's `model_version`)."""


class VersionConfig(StrictModel):
    """A further version of a member: its own model file (same inputs and classes), replicas."""

    version: VersionLabel = Field(description="Its version label (a positive integer).")
    model: Path = Field(description="ONNX file, relative to this config file's directory.")
    card: Path | None = Field(
        None, description="Member card JSON; default: `<model stem>.card.json` beside the model."
    )
    sha256: Sha256Hex | None = Field(
        None, description="Hex SHA-256 the model file must have (as for the member's own)."
    )
    placement: list[Placement] | None = Field(
        None, min_length=1, description="Tiers this version runs on; default: the member's."
    )


class SplitConfig(StrictModel):
    """A member split between its two placements' tiers: per call, its split policy runs the
    model all on the first (the head tier, the edge), all on the second (the tail tier, the
    cloud), or cut at a tensor: the head on the first, the tensor across the second's link,
    the tail there (docs/models.md#split-computing)."""

    policy: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="latency"),
        description="Split policy: `latency` (the least expected latency now) or `fixed` "
        "(params `at`).",
    )
    at: list[str] | None = Field(
        None,
        min_length=1,
        description="Cut tensors offered besides all-edge and all-cloud; default: each cut "
        "point that sends fewer bytes than the input and every earlier cut.",
    )


class RolloutConfig(StrictModel):
    """A candidate version tried against the serving one, promoted or rolled back on evidence.

    Each measure compares the candidate with the serving (stable) version over the calls and
    labels both received since the rollout began; a measure decides only once both versions
    have its minimum sample. Any measure past its threshold rolls back; all of them within
    theirs promote. A threshold of null leaves that measure out."""

    version: VersionLabel = Field(description="The candidate version.")
    mode: Literal["canary", "shadow"] = Field(
        "canary",
        description="`canary`: the candidate answers `weight` of the member's calls; `shadow`: "
        "it gets a mirrored copy of every call, its answer compared with the serving "
        "version's and never returned.",
    )
    weight: float = Field(
        0.1, gt=0, lt=1, description="Share of the member's calls the canary answers."
    )
    min_calls: int = Field(
        100,
        ge=10,
        le=1_000_000,
        description="Calls each version needs before errors, latency and agreement decide.",
    )
    min_labels: int = Field(
        100,
        ge=10,
        le=1_000_000,
        description="Labelled rows (feedback) each version needs before accuracy decides.",
    )
    max_error_rate_increase: float | None = Field(
        0.01, ge=0, le=1, description="Candidate error rate minus the stable's, at most."
    )
    max_latency_ratio: float | None = Field(
        1.5, ge=1, le=100, description="Candidate p95 latency over the stable's, at most."
    )
    latency_slack_s: float = Field(
        0.005,
        ge=0,
        le=60,
        description="A candidate p95 at most this much above the stable's passes whatever "
        "the ratio: a few milliseconds between two small samples are the host's scheduling "
        "noise, not the model.",
    )
    max_accuracy_drop: float | None = Field(
        0.02,
        ge=0,
        le=1,
        description="Stable accuracy minus the candidate's on labelled "
        "rows, at most (canary: each version's own answers; shadow: not measured).",
    )
    min_agreement: float | None = Field(
        0.9,
        ge=0,
        le=1,
        description="Share of rows where the candidate's top class equals "
        "the stable's, at least (shadow only: a canary call asks one version).",
    )
    auto: bool = Field(
        True,
        description="Promote or roll back on the evidence; false: only measure and "
        "report (`POST /admin/rollout/{member}` decides).",
    )


class MemberConfig(StrictModel):
    """One ensemble member: an ONNX classifier and where its replicas run."""

    name: Name = Field(description="Member name; also addressable as a model of its own.")
    model: Path = Field(description="ONNX file, relative to this config file's directory.")
    card: Path | None = Field(
        None, description="Member card JSON; default: `<model stem>.card.json` beside the model."
    )
    sha256: Sha256Hex | None = Field(
        None,
        description="Hex SHA-256 the model file must have (with external data files, the "
        "digest over them all that `ensemble validate` prints); the gateway refuses a file that "
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

    version: VersionLabel = Field("1", description="The version `model` is.")
    versions: list[VersionConfig] = Field(
        default_factory=list,
        description="Further versions, each with its own model file and "
        "replicas; addressed as `/v2/models/{name}/versions/{version}`.",
    )
    default_version: VersionLabel | None = Field(
        None,
        description="The version unversioned calls and ensembles use; default: the "
        "latest (highest) loaded one that is not a rollout's candidate.",
    )
    rollout: RolloutConfig | None = Field(
        None, description="A candidate version tried on live traffic (docs/models.md#versions)."
    )
    loaded: bool = Field(
        True,
        description="Served; false: known but unloaded (`POST /v2/repository/models/"
        "{name}/load` loads it).",
    )
    split: SplitConfig | None = Field(
        None,
        description="Run the model split between its two placements' tiers (edge head, cloud "
        "tail), chosen per call; both placements in-process with one replica.",
    )
    loaded_versions: list[VersionLabel] | None = Field(
        None, description="The versions served (the others are unloaded); default: all."
    )

    @model_validator(mode="after")
    def _split_placements(self) -> MemberConfig:
        if self.split is None:
            return self
        places = self.placement
        if len(places) != 2 or places[0].tier == places[1].tier:
            raise ValueError(
                "split: needs two placements on different tiers: the head tier first (the "
                "edge), the tail tier second (the cloud)"
            )
        for place in places:
            if place.backend != "inprocess" or place.replicas.min != 1 or place.replicas.max != 1:
                raise ValueError(
                    "split: both placements must be `inprocess` with replicas {min: 1, max: 1} "
                    "(a split member's head and tails run in the gateway's process, the tails "
                    "behind the tail tier's link)"
                )
        if self.versions:
            raise ValueError("split: a split member serves one version (no `versions`)")
        return self

    @model_validator(mode="after")
    def _versions_known(self) -> MemberConfig:
        labels = [self.version, *(v.version for v in self.versions)]
        twice = sorted({v for v in labels if labels.count(v) > 1})
        if twice:
            raise ValueError(f"versions: version {', '.join(twice)} given more than once")
        for field, value in (
            ("default_version", self.default_version),
            ("rollout.version", self.rollout.version if self.rollout else None),
            *(("loaded_versions", v) for v in self.loaded_versions or ()),
        ):
            if value is not None and value not in labels:
                raise ValueError(f"{field}: no version {value!r}; versions: {', '.join(labels)}")
        served = self.served_versions()
        if self.loaded and not served:
            raise ValueError("loaded_versions: empty; keep a version loaded or set loaded: false")
        if self.loaded and self.default_version not in (None, *served):
            raise ValueError(f"default_version: version {self.default_version} is not loaded")
        if self.rollout is not None and self.loaded:
            candidate = self.rollout.version
            if candidate == self.default_version:
                raise ValueError(
                    "rollout.version: is the default_version; a rollout tries "
                    "another version against it"
                )
            if candidate not in served or len(served) < 2:
                raise ValueError("rollout: needs the candidate and another version loaded")
        return self

    def served_versions(self) -> list[str]:
        """The versions served (none when the member is unloaded), lowest first."""
        if not self.loaded:
            return []
        labels = [self.version, *(v.version for v in self.versions)]
        keep = self.loaded_versions
        return sorted((v for v in labels if keep is None or v in keep), key=int)

    def label(self, version: str) -> str:
        """A version's name in metrics and scaling: the member's for its first version (its
        `model`), ``NAME:VERSION`` for the others."""
        return self.name if version == self.version else f"{self.name}:{version}"

    def at_version(self, version: str) -> MemberConfig:
        """This member as one of its versions serves it: that version's model, card, digest
        and placement, with no further versions."""
        if version == self.version:
            return self.model_copy(update={"versions": [], "rollout": None})
        spec = next(v for v in self.versions if v.version == version)
        return self.model_copy(
            update={
                "version": version,
                "model": spec.model,
                "card": spec.card,
                "sha256": spec.sha256,
                "placement": spec.placement or self.placement,
                "versions": [],
                "rollout": None,
            }
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
    loaded: bool = Field(
        True, description="Served; false: known but unloaded (its members stay addressable)."
    )


class ModelZooConfig(StrictModel):
    """Where the built-in model zoo lives; `serve` builds it when member files are missing."""

    dir: Path = Field(Path("../models/digits"), description="Zoo directory, relative to config.")
    build_if_missing: bool = Field(True, description="Build the zoo on first use.")
