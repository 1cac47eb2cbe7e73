"""Model integrity: the SHA-256 digests a model must have, and reading it verified."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.models.card import MemberCard
from ensemble.onnx_files import ModelFiles, read_model_files, sha256_hex

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
    """The model at ``path`` as one self-contained byte string, its files (the model file and
    any external data files) read once, when they hash to every ``expected`` digest: these
    very bytes are what gets loaded, so no file can change between check and load.
    ModelIntegrityError otherwise (also with no expected digest, unless ``allow_unverified``).
    Blocking: call it off the event loop."""
    files = _read(member, path)
    if expected or not allow_unverified:
        _check(member, files, expected)
    try:
        return files.self_contained()
    except EnsembleError as exc:
        raise EnsembleError(f"member {member!r}: {exc}") from exc


def verified_digest(member: str, path: Path, expected: Sequence[Digest]) -> str:
    """The digest of the model at ``path`` once its files were read and checked against the
    ``expected`` digests (as ``read_verified``)."""
    files = _read(member, path)
    _check(member, files, expected)
    return files.digest()


def model_digest(path: Path) -> str:
    """The SHA-256 of the model at ``path`` (its external data files included), as cards and
    pins give it; EnsembleError when a file cannot be read."""
    return read_model_files(path).digest()


def _read(member: str, path: Path) -> ModelFiles:
    try:
        return read_model_files(path)
    except EnsembleError as exc:
        raise EnsembleError(f"member {member!r}: {exc}") from exc


def _check(member: str, files: ModelFiles, expected: Sequence[Digest]) -> None:
    why = problem(member, files.describe(), files.digest(), expected)
    if why is not None:
        raise ModelIntegrityError([why], [member])
