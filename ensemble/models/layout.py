"""Names of the members and files that make up a digits zoo directory."""

from __future__ import annotations

from pathlib import Path

from ensemble.models.card import CARD_SUFFIX, MANIFEST_FILE

ZOO_FORMAT_VERSION = 3
"""Bumped when the directory layout or card schema changes, so old zoos get rebuilt."""

DEFAULT_ZOO_DIR = Path("models/digits")
"""Where the zoo lives, relative to the working directory."""

TEST_SET_FILE = "test.npz"

MEMBER_NAMES: tuple[str, ...] = (
    "logreg",
    "forest",
    "mlp_small",
    "mlp_large",
    "svm",
    "mlp_deep",
    "mlp_small_int8",
    "mlp_large_int8",
    "mlp_deep_int8",
)


def default_zoo_dir() -> Path:
    """Return :data:`DEFAULT_ZOO_DIR` resolved against the current working directory."""
    return Path.cwd() / DEFAULT_ZOO_DIR


def model_file(member: str) -> str:
    """File name of a member's ONNX model inside the zoo directory."""
    return f"{member}.onnx"


def card_file(member: str) -> str:
    """File name of a member's card inside the zoo directory."""
    return f"{member}{CARD_SUFFIX}"


def zoo_files() -> list[str]:
    """Every file a complete zoo directory holds; the manifest comes last."""
    files = [name for member in MEMBER_NAMES for name in (model_file(member), card_file(member))]
    return [*files, TEST_SET_FILE, MANIFEST_FILE]
