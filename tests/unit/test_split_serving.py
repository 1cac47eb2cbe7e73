"""A split member's parts without sockets, in virtual time: the emulated slow device, the
splitter's choice (the policy's, a request's `split`, a request's `tier`), a path's measured
overhead, and the cuts a member offers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from ensemble.config import LinkConfig
from ensemble.control.splitting import offered_cuts
from ensemble.errors import InvalidInput
from ensemble.replicas.faults import SlowReplica
from ensemble.replicas.links import Link, LinkedReplica
from ensemble.replicas.split import Part, SplitPath, Splitter
from policies import registry
from policies.base import SplitPolicy
from tests.unit.test_links import FakeClock

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"
FEED = {"input": np.zeros((1, 64), np.float32)}


class Timed:
    """A replica whose calls take ``seconds`` on ``clock``; answers with ``answer``."""

    def __init__(self, name: str, clock: FakeClock, seconds: float, answer: str) -> None:
        self.name, self.tier = name, name.split("/")[0]
        self._clock, self.seconds, self.answer = clock, seconds, answer
        self.seen: list[dict[str, np.ndarray]] = []

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.seen.append(feed)
        await self._clock.sleep(self.seconds)
        return {self.answer: np.ones((1, 4), np.float32)}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Runner:
    """What a split part needs of a session runner: its cost estimate."""

    def __init__(self, fixed_s: float) -> None:
        self.fixed_s, self.per_row_s = fixed_s, 0.0

    def estimate_s(self, rows: int) -> float:
        return self.fixed_s


def test_a_slow_device_takes_factor_times_a_calls_duration() -> None:
    clock = FakeClock()
    inner = Timed("edge/0", clock, 0.002, "out")
    slow = SlowReplica(inner, 10.0, clock=clock)  # type: ignore[arg-type]
    assert slow.extra_s(1) is None  # not in process: known only from the call itself
    asyncio.run(slow.infer(FEED))
    assert clock.time_s == pytest.approx(0.020)


def setup(delay_ms: float = 1.0, bandwidth_mbps: float | None = None) -> tuple[Splitter, Link]:
    clock = FakeClock()
    link = Link(
        "cloud",
        LinkConfig(emulate=True, delay_ms=delay_ms, jitter_ms=0, bandwidth_mbps=bandwidth_mbps),
        clock=clock,
    )

    def part(name: str, seconds: float, answer: str, linked: bool = False) -> Part:
        replica = Timed(name, clock, seconds, answer)
        outer = LinkedReplica(replica, link) if linked else replica
        return Part(outer, Runner(seconds))  # type: ignore[arg-type]

    paths = [
        SplitPath("edge", "edge", part("edge/full", 0.010, "probabilities"), None),
        SplitPath(
            "cloud",
            "cloud",
            None,
            part("cloud/full", 0.0001, "probabilities", True),
            sent_per_row=256,
            returned_per_row=48,
        ),
        SplitPath(
            "h",
            "cloud",
            part("edge/head", 0.001, "h"),
            part("cloud/tail", 0.0001, "probabilities", True),
            cut="h",
            sent_per_row=96,
            returned_per_row=48,
        ),
    ]
    for path in paths:
        path.clock = clock  # type: ignore[assignment]
    policy = registry.build("split", "latency", None, SplitPolicy)
    return Splitter("deep", paths, policy, link), link


def test_the_splitter_follows_the_link_and_what_a_request_asks() -> None:
    splitter, link = setup(delay_ms=0.5)
    assert splitter.choose(1).option == "cloud"
    link.override({"delay_ms": 30})
    assert splitter.choose(1).option == "edge"
    link.override({"delay_ms": 1, "bandwidth_mbps": 0.32})
    assert splitter.choose(1).option == "h"
    assert splitter.choose(1, "cloud").option == "cloud"  # the request's `split`
    assert splitter.choose(1, None, "edge").option == "edge"  # its data stays on the edge
    assert splitter.choose(1, None, "cloud").option == "cloud"
    with pytest.raises(InvalidInput, match="options: edge, cloud, h"):
        splitter.choose(1, "nowhere")
    assert splitter.chosen == {"cloud": 3, "edge": 2, "h": 1}


def test_a_cut_sends_the_head_tensor_and_learns_its_overhead() -> None:
    splitter, _ = setup(delay_ms=1.0)
    path = splitter.paths["h"]
    result = asyncio.run(path.infer(FEED, ["probabilities"]))
    assert list(result) == ["probabilities"]
    tail = path.tail
    assert tail is not None
    inner = tail.replica.inner  # type: ignore[attr-defined]
    assert list(inner.seen[0]) == ["h"]  # the tail got the cut tensor, not the input
    # Modelled: 1 ms head + 0.1 ms tail + 2 x 1 ms link; it took exactly that: no overhead.
    assert path.overhead_s == pytest.approx(0.0, abs=1e-9)
    inner.seconds = 0.0101  # the tail now takes 10 ms more than its runner says
    asyncio.run(path.infer(FEED))
    assert path.overhead_s == pytest.approx(0.001)  # a tenth of the excess, smoothed
    assert path.view(1).overhead_s == pytest.approx(0.001)


def test_a_member_offers_the_cuts_that_send_less_than_anything_before() -> None:
    model = onnx.load(ZOO / "mlp_deep.onnx")
    cuts = offered_cuts(model, None, 256)
    sizes = [c.bytes_per_row for c in cuts]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 96  # the 24-wide layer
    assert all(s is not None and s < 256 for s in sizes)
    chosen = offered_cuts(model, [cuts[-1].tensor], 256)
    assert [c.tensor for c in chosen] == [cuts[-1].tensor]
    with pytest.raises(Exception, match="not a cut point"):
        offered_cuts(model, ["nope"], 256)
