"""A member split between two tiers: per call, all on the head tier (the edge), all on the tail
tier (the cloud), or cut at a tensor, the head on the edge and the tail in the cloud, the tensor
across the tail tier's link (Neurosurgeon, Kang et al., ASPLOS'17).

Each way is a `SplitPath`, a replica of the member; the `Splitter` asks the member's split
policy which path a call takes, from each path's compute per tier (its sessions' measured cost
for the call's rows, times the tier's emulated slowdown), its bytes on the wire, and the link's
delay and bandwidth as they are now.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.errors import InvalidInput, clip
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import SessionRunner
from ensemble.replicas.faults import SlowReplica
from ensemble.replicas.links import Link
from ensemble.types import SplitContext, SplitOption
from policies.base import SplitPolicy
from policies.split import expected_s

EDGE = "edge"
"""The option that runs the whole model on the head tier."""
CLOUD = "cloud"
"""The option that runs the whole model on the tail tier."""
OVERHEAD_WEIGHT = 0.1
"""Weight of a call's measured overhead in a path's smoothed one."""


@dataclass
class Part:
    """One tier's share of a path: a replica (in-process, maybe slowed down and behind a
    link) and how to estimate its compute."""

    replica: Replica
    runner: SessionRunner
    slow: SlowReplica | None = None
    """The tier's emulated slowdown around the session, when it has one."""

    def compute_s(self, rows: int) -> float:
        """The session's measured cost for ``rows`` rows, plus what the emulated slowdown
        adds."""
        extra = self.slow.extra_s(rows) if self.slow is not None else None
        return self.runner.estimate_s(rows) + (extra or 0.0)


class SplitPath:
    """One way to run a split member's call, as a replica: a head part, a tail part, or both
    with the ``cut`` tensor between them."""

    def __init__(
        self,
        option: str,
        tier: str,
        head: Part | None,
        tail: Part | None,
        *,
        cut: str | None = None,
        sent_per_row: int = 0,
        returned_per_row: int = 0,
    ) -> None:
        self.option = option
        self.name = f"split:{option}"
        self.tier = tier
        self.head = head
        self.tail = tail
        self.cut = cut
        self.sent_per_row = sent_per_row if tail is not None else 0
        self.returned_per_row = returned_per_row if tail is not None else 0
        self.overhead_s = 0.0
        """Smoothed excess of its calls' latency over their modelled compute and link time."""
        self.modelled_s: Callable[[SplitOption], float] = lambda option: 0.0
        """A call's compute and link time as the splitter models it (set by the splitter)."""
        self.clock: Clock = SYSTEM_CLOCK

    def parts(self) -> list[Part]:
        return [p for p in (self.head, self.tail) if p is not None]

    def ready(self) -> bool:
        return all(p.replica.ready() for p in self.parts())

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        rows = next(iter(feed.values())).shape[0]
        modelled = self.modelled_s(self.view(rows, overhead=False))
        started = self.clock.now()
        if self.head is not None and self.tail is not None:
            assert self.cut is not None
            middle = await self.head.replica.infer(feed, [self.cut])
            result = await self.tail.replica.infer({self.cut: middle[self.cut]}, outputs)
        else:
            (part,) = self.parts()
            result = await part.replica.infer(feed, outputs)
        excess = max(0.0, self.clock.now() - started - modelled)
        self.overhead_s += OVERHEAD_WEIGHT * (excess - self.overhead_s)
        return result

    def view(self, rows: int, *, overhead: bool = True) -> SplitOption:
        return SplitOption(
            self.option,
            self.head.compute_s(rows) if self.head is not None else 0.0,
            self.tail.compute_s(rows) if self.tail is not None else 0.0,
            self.sent_per_row * rows,
            self.returned_per_row * rows,
            self.ready(),
            self.overhead_s if overhead else 0.0,
        )

    async def start(self) -> None:
        for part in self.parts():
            await part.replica.start()

    async def close(self) -> None:
        for part in self.parts():
            await part.replica.close()


class Splitter:
    """Chooses a split member's path per call; counts the choices."""

    def __init__(
        self, member: str, paths: Sequence[SplitPath], policy: SplitPolicy, link: Link | None
    ) -> None:
        """``paths``: `edge` (all on the head tier), `cloud` (all on the tail tier), the cuts."""
        self.member = member
        self.paths = {p.option: p for p in paths}
        self.policy = policy
        self.link = link
        """The tail tier's emulated link (None: none, the tiers are one network hop apart)."""
        self.chosen: Counter[str] = Counter()
        for path in paths:
            path.modelled_s = self._modelled_s

    def _link(self) -> tuple[float, float | None]:
        """The tail tier's one-way delay and bandwidth (bytes/s; None: unlimited) now."""
        if self.link is None or not self.link.emulated:
            return 0.0, None
        settings = self.link.settings
        bandwidth = None
        if settings.bandwidth_mbps is not None:
            bandwidth = settings.bandwidth_mbps * 1e6 / 8
        return settings.delay_ms / 1e3, bandwidth

    def _modelled_s(self, option: SplitOption) -> float:
        delay_s, bandwidth = self._link()
        return expected_s(option, SplitContext(self.member, 0, (), delay_s, bandwidth))

    def context(self, rows: int) -> SplitContext:
        """What the policy sees for a call of ``rows`` rows now."""
        delay_s, bandwidth = self._link()
        options = tuple(p.view(rows) for p in self.paths.values())
        return SplitContext(self.member, rows, options, delay_s, bandwidth)

    def choose(self, rows: int, forced: str | None = None, tier: str | None = None) -> SplitPath:
        """The path of a call of ``rows`` rows: ``forced`` (a request's `split` parameter),
        else all on ``tier`` when the request keeps its data there (its `tier`), else the
        policy's choice. InvalidInput for a forced option the member has not."""
        if forced is None and tier is not None:
            forced = EDGE if tier == self.paths[EDGE].tier else CLOUD
        if forced is not None:
            path = self.paths.get(forced)
            if path is None:
                raise InvalidInput(
                    f"member {self.member!r} cannot run split at {clip(forced)!r}; options: "
                    f"{', '.join(self.paths)}"
                )
        else:
            path = self.paths[self.policy.choose(self.context(rows))]
        self.chosen[path.option] += 1
        return path
