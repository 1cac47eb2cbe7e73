"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.models import ensure_zoo


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The digits zoo under ``<repo>/models/digits``, built once and reused across runs."""
    path = Path(__file__).resolve().parent.parent / "models" / "digits"
    ensure_zoo(path)
    return path
