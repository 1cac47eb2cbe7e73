"""Model file integrity: the SHA-256 digests a model file must have, and reading it verified."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.models.card import MemberCard

PIN_SOURCE = "the `sha256` pinned in its config"
EXIT_INTEGRITY = 3
"""`ensemble replica`'s exit code when its model file fails its digest check (card, --sha256),
so the gateway that started it as a process replica can tell that from other failures."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A SHA-256 a model file must hash to, and who says so."""

    hex: str
    """Lower-case hex digest."""
    source: str
    """Where it comes from, as messages name it: ``its card PATH`` or the config pin."""


def expected_digests(
    card: MemberCard | None, card_path: Path | None, pin: str | None
) -> tuple[Digest, ...]:
    """Every digest the gateway holds for a member's model file: its card's (the card's
    accuracy and latency describe that file and no other) and the one pinned in its config.
    A file is served only when it matches all of them."""
    found = []
    if pin is not None:
        found.append(Digest(pin.lower(), PIN_SOURCE))
    if card is not None:
        found.append(Digest(card.sha256, f"its card {card_path}" if card_path else "its card"))
    return tuple(found)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def problem(member: str, what: str, actual: str, expected: Sequence[Digest]) -> str | None:
    """Why ``what`` (a model file, hashing to ``actual``) may not be served as ``member``; None
    when it may. No expected digest at all is a problem too."""
    if not expected:
        return (
            f"member {member!r}: {what} has no digest to be checked against (no member card, "
            f"no `sha256` in its config); its SHA-256 is {actual}: if it is the intended "
            f"model, pin it with `sha256: {actual}` in the member's config"
        )
    for digest in expected:
        if digest.hex != actual:
            return (
                f"member {member!r}: {what} has SHA-256 {actual}, but {digest.source} expects "
                f"{digest.hex}; refusing to serve it (restore the file, or rebuild its card / "
                "update the pin if the change is intended)"
            )
    return None


def verify(member: str, data: bytes, expected: Sequence[Digest], what: str) -> None:
    """ModelIntegrityError unless ``data`` hashes to every ``expected`` digest (and there is
    one at least)."""
    why = problem(member, what, sha256_hex(data), expected)
    if why is not None:
        raise ModelIntegrityError([why], [member])


def read_verified(
    member: str, path: Path, expected: Sequence[Digest], *, allow_unverified: bool = False
) -> bytes:
    """The bytes of ``path``, read once, when they hash to every ``expected`` digest; these
    very bytes are what gets loaded, so the file cannot change between check and load.
    ModelIntegrityError otherwise (also with no expected digest, unless ``allow_unverified``).
    Blocking: call it off the event loop."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EnsembleError(
            f"member {member!r}: cannot read model file {path}: {exc.strerror or exc}"
        ) from exc
    if expected or not allow_unverified:
        verify(member, data, expected, f"model file {path}")
    return data
