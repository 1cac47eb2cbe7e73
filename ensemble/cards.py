"""A config member's card and the digests its model file must match."""

from __future__ import annotations

from pathlib import Path

from ensemble.config import GatewayConfig, MemberConfig
from ensemble.errors import EnsembleError
from ensemble.integrity import Digest, expected_digests
from ensemble.models.card import MemberCard, card_path_for, load_card


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
