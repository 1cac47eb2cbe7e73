"""Member cards and the zoo manifest: the schema and its JSON files on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OipDatatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
"""Tensor datatype names of the Open Inference Protocol that this project can carry."""

MANIFEST_FILE = "zoo.json"
CARD_SUFFIX = ".card.json"


class TensorSpec(BaseModel):
    """Name, datatype and shape of one model input or output."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name as the model (and OIP requests) spell it.")
    datatype: OipDatatype = Field(description="OIP datatype name, e.g. FP32 or INT64.")
    shape: list[int] = Field(description="Dimensions; -1 marks a dynamic dimension.")


class LatencyStats(BaseModel):
    """Latency of repeated single-threaded onnxruntime calls at one batch size."""

    model_config = ConfigDict(extra="forbid")

    p50_ms: float = Field(ge=0, description="Median call latency in milliseconds.")
    p99_ms: float = Field(ge=0, description="99th percentile call latency in milliseconds.")
    mean_ms: float = Field(ge=0, description="Mean call latency in milliseconds.")
    runs: int = Field(ge=1, description="Number of timed calls (after warm-up).")


class InputReference(BaseModel):
    """The training split's distribution of one [N, F] input, per feature: what the gateway
    measures input drift (PSI) and out-of-range features against."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="The input tensor it describes.")
    edges: list[list[float]] = Field(
        description="Per feature, the inner bin edges (training deciles, repeats dropped): a "
        "value v falls in the first bin whose edge is >= v, else in the last."
    )
    proportions: list[list[float]] = Field(
        description="Per feature, the training rows' share in each bin (one more than edges)."
    )
    low: list[float] = Field(description="Per feature, the smallest training value.")
    high: list[float] = Field(description="Per feature, the largest training value.")
    rows: int = Field(ge=1, description="Training rows it was computed from.")

    @model_validator(mode="after")
    def _check_shape(self) -> InputReference:
        width = len(self.edges)
        if not width or any(len(x) != width for x in (self.proportions, self.low, self.high)):
            raise ValueError("edges, proportions, low and high must list the same features")
        if any(len(p) != len(e) + 1 for e, p in zip(self.edges, self.proportions, strict=True)):
            raise ValueError("each feature needs one proportion more than it has edges")
        return self


class MemberCard(BaseModel):
    """What the gateway knows about one ensemble member without running it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Member name, unique within its zoo.")
    model_file: str = Field(description="ONNX file name, relative to the card's directory.")
    family: str = Field(description="Model family, e.g. linear, forest, mlp, svm.")
    variant: Literal["fp32", "int8"] = Field(description="Numeric variant of the weights.")
    dataset: str = Field(description="Data set the member was trained and evaluated on.")
    seed: int = Field(description="Seed used for the data split and training.")
    classes: list[int] = Field(
        min_length=1, description="Class labels, in the column order of the probability output."
    )
    inputs: list[TensorSpec] = Field(min_length=1, description="Model inputs.")
    outputs: list[TensorSpec] = Field(min_length=1, description="Model outputs.")
    probability_output: str = Field(
        description="Name of the output holding class probabilities, shape [N, len(classes)]."
    )
    label_output: str | None = Field(
        description="Name of the output holding predicted labels; None means argmax of "
        "the probability output."
    )
    accuracy: float = Field(ge=0, le=1, description="Accuracy on the validation split.")
    test_accuracy: float = Field(ge=0, le=1, description="Accuracy on the test split.")
    per_class_accuracy: dict[str, float] = Field(
        description="Recall per class on the validation split, keyed by the class label."
    )
    size_bytes: int = Field(ge=0, description="Size of the model file in bytes.")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 digest of the model file."
    )
    parameters: int | None = Field(
        ge=0, description="Number of learned weights where meaningful (linear, mlp), else None."
    )
    latency_ms: dict[str, LatencyStats] = Field(
        description="onnxruntime latency keyed by batch size ('batch_1', 'batch_32'), measured "
        "with one intra-op and one inter-op thread, sequential execution, all graph "
        "optimisations."
    )
    validation_predictions: list[int] = Field(
        description="Predicted label per validation example, in the manifest's "
        "validation_labels order."
    )
    validation_probabilities: list[list[float]] = Field(
        description="Class probabilities per validation example (rounded to 5 decimals), "
        "in the manifest's validation_labels order."
    )
    input_reference: InputReference | None = Field(
        default=None,
        description="The training inputs' distribution (drift and out-of-range detection); "
        "None: the gateway cannot watch this member's inputs.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> MemberCard:
        output_names = {spec.name for spec in self.outputs}
        if self.probability_output not in output_names:
            raise ValueError(f"probability_output {self.probability_output!r} is not an output")
        if self.label_output is not None and self.label_output not in output_names:
            raise ValueError(f"label_output {self.label_output!r} is not an output")
        if len(self.validation_probabilities) != len(self.validation_predictions):
            raise ValueError("validation_probabilities and validation_predictions differ in length")
        width = len(self.classes)
        if any(len(row) != width for row in self.validation_probabilities):
            raise ValueError(f"every validation_probabilities row must have {width} entries")
        return self


class ZooManifest(BaseModel):
    """Index of a built zoo: how it was built and the labels its cards are scored against."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(ge=1, description="Layout version of the zoo directory.")
    dataset: str = Field(description="Data set every member was trained and evaluated on.")
    seed: int = Field(description="Seed used for the data split and training.")
    classes: list[int] = Field(min_length=1, description="Class labels shared by all members.")
    train_size: int = Field(ge=1, description="Examples in the training split.")
    validation_size: int = Field(ge=1, description="Examples in the validation split.")
    test_size: int = Field(ge=1, description="Examples in the test split (stored in test_file).")
    validation_labels: list[int] = Field(
        description="True label per validation example; cards' validation predictions follow "
        "this order."
    )
    test_file: str = Field(
        description="File (relative to the zoo directory) holding the test split as arrays "
        "X (float32 [n, 64]) and y (int64 [n])."
    )
    members: list[str] = Field(
        min_length=1, description="Member names; each has <name>.onnx and <name>.card.json."
    )
    build_seconds: float = Field(ge=0, description="Wall-clock time the build took.")
    built_at: str = Field(description="UTC time the build finished, ISO 8601.")
    library_versions: dict[str, str] = Field(
        description="Versions of the libraries that trained, exported and profiled the members."
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> ZooManifest:
        if len(self.validation_labels) != self.validation_size:
            raise ValueError("validation_labels length differs from validation_size")
        return self


def card_path_for(model_path: Path) -> Path:
    """Return the card file that sits next to ``model_path``: ``<model stem>.card.json``."""
    return model_path.with_name(model_path.stem + CARD_SUFFIX)


def load_card(path: Path) -> MemberCard:
    """Read and validate a member card; raises pydantic.ValidationError on a bad card."""
    return MemberCard.model_validate_json(path.read_bytes())


def save_card(card: MemberCard, path: Path) -> None:
    """Write a member card as JSON, replacing any previous file atomically."""
    write_text_atomic(path, card.model_dump_json(indent=2) + "\n")


def load_manifest(zoo_dir: Path) -> ZooManifest:
    """Read and validate ``zoo.json`` in ``zoo_dir``."""
    return ZooManifest.model_validate_json((zoo_dir / MANIFEST_FILE).read_bytes())


def save_manifest(manifest: ZooManifest, zoo_dir: Path) -> None:
    """Write ``zoo.json`` into ``zoo_dir``, replacing any previous file atomically."""
    write_text_atomic(zoo_dir / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new content."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
