"""The one seam every backend implements: a replica that runs a model on a feed of tensors."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
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

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[dict[str, np.ndarray]]:
        """Start the model on ``feed``; the awaitable gives the named outputs (all when None).

        Returning an awaitable rather than being a coroutine lets a backend hand back a future
        it already has (the in-process engine does), so the dispatcher creates no task per call.
        """
        ...

    async def start(self) -> None:
        """Begin background work (a remote replica's health checks), on the event loop, before
        the replica takes calls; returns once ``ready()`` reflects a first look at it."""
        ...

    async def close(self) -> None:
        """Stop background work and release the replica's resources."""
        ...


def innermost(replica: Replica) -> Replica:
    """The backend replica under any wrappers (faults, links, devices), which keep the replica
    they wrap as ``inner``."""
    while (inner := getattr(replica, "inner", None)) is not None:
        replica = inner
    return replica
