"""The emulated device (`placement.device`): a replica serves at most `concurrency` calls at once,
each holding its slot at least `service_ms`; what makes replica counts matter in scaling tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ensemble.clock import VirtualClock
from ensemble.config import parse_yaml
from ensemble.errors import ConfigError
from ensemble.replicas.faults import DeviceReplica

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"


class Instant:
    name, tier = "edge/0", "edge"

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return {"y": feed["x"]}

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def test_calls_queue_for_the_devices_slots() -> None:
    clock = VirtualClock()
    device = DeviceReplica(Instant(), service_s=0.05, concurrency=2, clock=clock)

    async def main() -> list[float]:
        async def one(i: int) -> float:
            out = await device.infer({"x": np.array([i])})
            assert out["y"][0] == i
            return clock.now()

        return sorted(await clock.run(asyncio.gather(*(one(i) for i in range(4)))))

    done = asyncio.run(main())
    # Two at a time, 50 ms each: two finish at 50 ms, the two that queued at 100 ms.
    assert done == [0.05, 0.05, 0.1, 0.1]


def test_device_config_is_validated() -> None:
    text = """
ensembles:
  - name: e
    members:
      - name: m
        model: logreg.onnx
        placement: [{tier: edge, device: {service_ms: 100, concurrency: 2}}]
"""
    cfg = parse_yaml(text, source="t.yaml", base_dir=ZOO)
    device = cfg.ensembles[0].members[0].placement[0].device
    assert device is not None and device.service_ms == 100 and device.concurrency == 2
    with pytest.raises(ConfigError, match="concurrency"):
        parse_yaml(text.replace("concurrency: 2", "concurrency: 0"), source="t.yaml", base_dir=ZOO)
