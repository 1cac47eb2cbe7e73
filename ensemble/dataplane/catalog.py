"""What the server says about its models, whichever protocol asks: the Triton-style model
configuration and the repository index (model metadata is `ModelMetadata` itself). The
frontends only render these into JSON or protobuf."""

from __future__ import annotations

from dataclasses import dataclass

from ensemble.repository import EnsembleModel, Repository, ServedModel
from ensemble.types import TensorSpec


@dataclass(frozen=True, slots=True)
class ConfigTensor:
    name: str
    datatype: str
    """The OIP datatype (Triton's config says ``TYPE_`` + this)."""
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A minimal Triton model configuration."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[ConfigTensor, ...]
    outputs: tuple[ConfigTensor, ...]
    parameters: tuple[tuple[str, str], ...] = ()
    """String parameters: an ensemble's default policy and members; a member version's card
    figures (test accuracy, batch-1 p50) and the SHA-256 its file was checked against."""


def model_config(model: ServedModel, max_batch_size: int) -> ModelConfig:
    """Triton's rule: a model that batches (every tensor's first dimension is variable) reports
    ``max_batch_size > 0`` and dims without the batch dimension; otherwise 0 and the full
    shape."""
    meta = model.metadata
    specs = (*meta.inputs, *meta.outputs)
    batching = max_batch_size > 0 and bool(specs) and all(s.shape[:1] == (-1,) for s in specs)

    def tensors(specs: tuple[TensorSpec, ...]) -> tuple[ConfigTensor, ...]:
        return tuple(
            ConfigTensor(s.name, s.datatype, s.shape[1:] if batching else s.shape) for s in specs
        )

    parameters: tuple[tuple[str, str], ...] = ()
    if isinstance(model, EnsembleModel):
        parameters = (("policy", model.profile), ("members", ",".join(model.members)))
    elif model.card is not None:  # the card this version was checked against when it loaded
        card = model.card
        one = card.latency_ms.get("batch_1")
        parameters = (
            ("version", model.version),
            ("card_accuracy", f"{card.test_accuracy:.4f}"),
            *((("card_latency_p50_ms", f"{one.p50_ms:g}"),) if one is not None else ()),
            ("sha256", card.sha256),
        )
    return ModelConfig(
        meta.name,
        meta.platform,
        max_batch_size if batching else 0,
        tensors(meta.inputs),
        tensors(meta.outputs),
        parameters,
    )


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    """``READY`` or ``UNAVAILABLE``."""
    reason: str


def repository_index(repository: Repository, *, ready_only: bool = False) -> list[IndexEntry]:
    """Every model and version the repository knows: served ones ``READY`` (or
    ``UNAVAILABLE`` with no ready replica; a member's versions say how each serves), unloaded
    ones ``UNAVAILABLE`` (only the ready ones if ``ready_only``)."""
    entries = []
    for name in repository.names():
        several = repository.versions.get(name)
        for version in repository.get(name).metadata.versions:
            model = repository.get(name, version)
            ready = model.ready()
            if ready_only and not ready:
                continue
            role = several.state(version) if several is not None else ""
            state, reason = ("READY", role) if ready else ("UNAVAILABLE", "no ready replica")
            entries.append(IndexEntry(name, version, state, reason))
    if not ready_only:
        entries += [IndexEntry(n, v, "UNAVAILABLE", "unloaded") for n, v in repository.unloaded]
    return entries


def rollout_report(repository: Repository) -> list[dict[str, object]]:
    """Each member serving several versions: which serves, each one's share of unversioned
    calls, and its rollout's phase, evidence and the readings it would decide on now."""
    report: list[dict[str, object]] = []
    for name, several in repository.versions.items():
        entry: dict[str, object] = {
            "member": name,
            "serving": several.default,
            "versions": {
                v: {"state": several.state(v), "share": several.share(v), "label": m.label}
                for v, m in several.members.items()
            },
        }
        rollout = several.rollout
        if rollout is not None:
            verdict, readings = rollout.verdict()
            alike, compared = rollout.agreement
            entry["rollout"] = {
                "candidate": rollout.candidate,
                "mode": rollout.rules.mode,
                "phase": rollout.phase,
                "reason": rollout.reason,
                "verdict_now": verdict,
                "readings": [r.describe() for r in readings],
                "evidence": {
                    v: {
                        "calls": e.calls,
                        "errors": e.errors,
                        "latency_p95_s": e.p95_s,
                        "labelled": e.labelled,
                        "accuracy": e.accuracy,
                    }
                    for v, e in rollout.evidence.items()
                },
                "agreement": alike / compared if compared else None,
                "compared_rows": compared,
            }
        report.append(entry)
    return report
