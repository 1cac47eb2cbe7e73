"""Entry points to the digits zoo: build it, build it only when incomplete, or load its manifest."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import ValidationError

from ensemble.errors import require_extra
from ensemble.models.card import ZooManifest, load_manifest
from ensemble.models.layout import MEMBER_NAMES, ZOO_FORMAT_VERSION, zoo_files

Progress = Callable[[str], None]
"""Receives one short human-readable line per build step."""


def build_zoo(out_dir: Path, *, seed: int = 0, progress: Progress | None = None) -> ZooManifest:
    """Train, export, quantize and profile every member into ``out_dir``, replacing any zoo there.

    The zoo is built in a temporary sibling directory and moved in file by file with
    ``zoo.json`` last, so an interrupted build never leaves a directory that reads as complete.
    """
    out_dir = out_dir.resolve()
    with _build_lock(out_dir):
        return _build(out_dir, seed, progress)


def ensure_zoo(out_dir: Path, progress: Progress | None = None) -> ZooManifest:
    """Return the zoo's manifest, building the zoo (seed 0) first if any file is missing."""
    out_dir = out_dir.resolve()
    manifest = complete_manifest(out_dir)
    if manifest is not None:
        return manifest
    with _build_lock(out_dir):
        # Another process may have finished the build while this one waited for the lock.
        manifest = complete_manifest(out_dir)
        if manifest is not None:
            return manifest
        return _build(out_dir, 0, progress)


def complete_manifest(zoo_dir: Path) -> ZooManifest | None:
    """Return the manifest if ``zoo_dir`` holds a complete zoo of the current layout, else None."""
    try:
        manifest = load_manifest(zoo_dir)
    except (OSError, ValidationError):
        return None
    if manifest.format_version != ZOO_FORMAT_VERSION or manifest.members != list(MEMBER_NAMES):
        return None
    if not all((zoo_dir / name).is_file() for name in zoo_files()):
        return None
    return manifest


def _build(out_dir: Path, seed: int, progress: Progress | None) -> ZooManifest:
    # Imported on demand: scikit-learn and skl2onnx take seconds to import, and code that only
    # reads cards (the gateway) should not pay for them.
    require_extra("sklearn", "zoo", "training the model zoo")
    require_extra("skl2onnx", "zoo", "training the model zoo")
    from ensemble.models.builder import build_unlocked

    return build_unlocked(out_dir, seed=seed, progress=progress or _discard)


def _discard(line: str) -> None:
    del line


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of one zoo across processes (test workers, replicas starting together)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
