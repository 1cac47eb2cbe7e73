"""The in-process backend: an onnxruntime session run by the shared in-process engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from ensemble.replicas.engine import InProcessEngine, SessionRunner


class InProcessReplica:
    """A replica living in the gateway's process; calls never block the event loop."""

    def __init__(self, name: str, tier: str, runner: SessionRunner, engine: InProcessEngine):
        self.name = name
        self.tier = tier
        self.runner = runner
        self._engine = engine
        self._closed = False

    def ready(self) -> bool:
        return not self._closed

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        return self._engine.submit(self.runner, feed, outputs or self.runner.output_names)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
