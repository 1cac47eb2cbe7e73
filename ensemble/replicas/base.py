"""The one seam every backend implements: a replica that runs a model on a feed of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Replica(Protocol):
    """One running copy of a model, reached through some backend."""

    name: str
    """Unique within its member, e.g. ``edge/0``."""
    tier: str

    def ready(self) -> bool:
        """True when the replica can take requests now."""
        ...

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the named outputs (all of them when ``outputs`` is None)."""
        ...

    async def close(self) -> None:
        """Release the replica's resources; in-flight calls may still finish."""
        ...
