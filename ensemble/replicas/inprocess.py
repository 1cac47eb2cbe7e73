"""The in-process backend: an onnxruntime session run on a bounded thread pool."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
import onnxruntime as ort

from ensemble.errors import EnsembleError, InvalidInput
from ensemble.replicas.onnx import OnnxSignature


class InProcessReplica:
    """A replica living in the gateway's process; calls never block the event loop."""

    def __init__(
        self,
        name: str,
        tier: str,
        session: ort.InferenceSession,
        executor: Executor,
        signature: OnnxSignature,
    ) -> None:
        self.name = name
        self.tier = tier
        self._session = session
        self._executor = executor
        self._output_names = [o.name for o in signature.outputs]
        self._map_outputs = signature.map_outputs
        self._closed = False

    def ready(self) -> bool:
        return not self._closed

    def _run(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._output_names
        try:
            values = self._session.run(names, feed)
        except Exception as exc:
            # onnxruntime reports bad shapes/types as InvalidArgument; anything else is ours.
            if type(exc).__name__ in ("InvalidArgument", "InvalidGraph"):
                raise InvalidInput(f"the model rejected the input: {exc}") from exc
            raise EnsembleError(f"onnxruntime failed: {exc}") from exc
        result = dict(zip(names, values, strict=True))
        for name, classes in self._map_outputs.items():
            if name in result:
                rows = result[name]
                result[name] = np.array([[row[c] for c in classes] for row in rows], np.float32)
        return result

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, feed, outputs)

    async def close(self) -> None:
        self._closed = True
