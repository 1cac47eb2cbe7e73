"""How hard `ensemble profile` measures each member x tier cell, and where it reports progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileSettings:
    """How hard to measure each member x tier cell."""

    requests: int = 1000
    concurrency: int = 4
    batch: int = 1
    warmup: int = 50
    max_seconds: float = 20.0
    """A cell stops starting calls after this long, whatever ``requests`` says."""
    all_tiers: bool = False
    """Also measure every member in-process on configured tiers it is not placed on."""


QUICK = ProfileSettings(requests=40, concurrency=2, warmup=5, max_seconds=5.0)
