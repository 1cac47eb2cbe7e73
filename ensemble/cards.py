"""A config member's card, the digests its model file must match, and the card checked
against the model it describes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ensemble.config import GatewayConfig, MemberConfig
from ensemble.errors import EnsembleError
from ensemble.integrity import Digest, expected_digests
from ensemble.models.card import MemberCard, card_path_for, load_card, load_manifest

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("ensemble.cards")

ACCURACY_TOLERANCE = 0.01
"""How far the accuracy a model scores on its zoo's test split may be from its card's."""
LATENCY_WARN_FACTOR = 5.0
"""A batch-1 p50 this many times the card's (plus 0.05 ms) is logged as a warning: hardware
differs between where a card was measured and where it serves, so latency never refuses."""


def card_path(cfg: GatewayConfig, member: MemberConfig) -> Path:
    """Where a config member's card is: its `card:`, else beside its model file."""
    return cfg.resolve(member.card) if member.card else card_path_for(cfg.resolve(member.model))


def member_card(cfg: GatewayConfig, member: MemberConfig) -> MemberCard | None:
    """A config member's card: None when it has none beside its model, an error when the one
    its `card:` names is absent or any is unreadable."""
    return read_card(card_path(cfg, member), member.name, required=member.card is not None)


def member_digests(
    cfg: GatewayConfig, member: MemberConfig, card: MemberCard | None
) -> tuple[Digest, ...]:
    """The digests a config member's model file must match: its config pin, its card's."""
    return expected_digests(card, card_path(cfg, member), member.sha256)


def read_card(path: Path, member: str, *, required: bool) -> MemberCard | None:
    """A member's card; None when an optional one is absent; an error when it is unreadable."""
    if not path.is_file():
        if required:
            raise EnsembleError(f"member {member!r}: card not found: {path}")
        return None
    try:
        return load_card(path)
    except Exception as exc:
        raise EnsembleError(f"member {member!r}: unreadable card {path}: {exc}") from exc


def check_card(
    member: str, card: MemberCard, where: Path, session: ort.InferenceSession
) -> tuple[float, float] | None:
    """Score the loaded model on the test split of the zoo its card belongs to (the manifest
    beside the card): EnsembleError when its accuracy is not the card's test accuracy (the
    card describes another model); its batch-1 p50 is measured beside the card's and logged.
    Returns (accuracy, p50 ms); None when there is no test split to score on (a card outside
    a zoo, a model with more than one input)."""
    from ensemble.models.profiling import measure_latency, predict

    try:
        manifest = load_manifest(where.parent)
        split = np.load(where.parent / manifest.test_file)
        x, y = np.asarray(split["X"]), np.asarray(split["y"])
    except (OSError, ValueError, KeyError):
        return None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or not len(y):
        return None
    x = x.astype(np.float32)
    answers = predict(
        session,
        x,
        probability_output=card.probability_output,
        label_output=card.label_output,
        classes=card.classes,
    )
    accuracy = answers.accuracy(y)
    if abs(accuracy - card.test_accuracy) > ACCURACY_TOLERANCE:
        raise EnsembleError(
            f"member {member!r}: its card {where} says test accuracy {card.test_accuracy:.4f}, "
            f"the model scores {accuracy:.4f} on the zoo's test split "
            f"({len(y)} rows): the card describes another model"
        )
    p50 = measure_latency(session, {inputs[0].name: x[:1]}, runs=20, warmup=3).p50_ms
    stated = card.latency_ms.get("batch_1")
    said = f"test accuracy {accuracy:.4f} (card {card.test_accuracy:.4f}), batch-1 p50 {p50:g} ms"
    if stated is not None and p50 > LATENCY_WARN_FACTOR * stated.p50_ms + 0.05:
        log.warning(
            "member %r: %s, card %g ms: slower here than where its card was measured",
            member,
            said,
            stated.p50_ms,
        )
    else:
        log.info("member %r: card checked: %s", member, said)
    return accuracy, p50
