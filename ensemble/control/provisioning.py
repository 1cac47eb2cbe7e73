"""Provisioning: one `Provisioner` per placement (member, tier) adds and removes its replicas.

The control loop and hot reload talk only to provisioners; a `Member` is the data plane's view
(its replicas, their stats, routing) and knows nothing of how replicas come and go. Which
provisioner a placement gets depends on its backend (`ensemble.control.backends`):

- `ReplicaSet` (in-process and process backends): makes replicas here, adds them to the
  member's routing once started, and drains the ones it added (never the configured ones).
- `RayScaler` (ray backend): one replica object stands for a Ray Serve deployment; scaling asks
  Serve for a replica count.
- `Static` (remote backends): a fixed set of servers; nothing to change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ensemble.config import AutoscalingConfig
from ensemble.errors import EnsembleError
from ensemble.replicas.base import Replica
from ensemble.replicas.member import Member
from ensemble.replicas.ray import RayReplica
from policies.base import AutoscalingPolicy

Key = tuple[str, str]
"""A placement: (member, tier)."""


class Provisioner(Protocol):
    """Adds and removes one placement's replicas."""

    member: Member
    tier: str
    provisioned: bool
    """False: its replicas are fixed here (a scaling decision is logged, not applied)."""
    per_worker: bool
    """Each of the gateway's workers has replicas of its own (in-process, process); False: the
    workers share the replicas (remote servers, a Ray deployment), the leader scales them."""

    def replicas(self) -> int:
        """Replicas it has now (draining ones are on their way out)."""
        ...

    async def scale(self, target: int) -> None:
        """Up or down to ``target`` replicas; EnsembleError when a replica cannot start."""
        ...

    def keep(self, count: int) -> None:
        """Before the member's replicas start: have ``count`` replicas (what the placement had
        before a hot reload). Blocking: in-process replicas load a session each."""
        ...

    async def close(self) -> None:
        """Stop work in progress (drains); the replicas close with their member."""
        ...


class Static:
    """A placement whose replicas are fixed: remote servers at configured endpoints."""

    provisioned = False
    per_worker = False

    def __init__(self, member: Member, tier: str) -> None:
        self.member, self.tier = member, tier

    def replicas(self) -> int:
        return len(self.member.serving(self.tier))

    async def scale(self, target: int) -> None:
        return None

    def keep(self, count: int) -> None:
        return None

    async def close(self) -> None:
        return None


class RayScaler:
    """A `ray` placement: Serve runs its deployment's replicas; ``set_target`` asks Serve for a
    count (blocking: one write to Ray's key-value store, read by Serve's autoscaling policy)."""

    provisioned = True
    per_worker = False

    def __init__(
        self, member: Member, replica: RayReplica, set_target: Callable[[str, str, int], None]
    ) -> None:
        self.member, self.tier = member, replica.tier
        self._replica = replica
        self._set_target = set_target

    def replicas(self) -> int:
        return self._replica.replicas

    async def scale(self, target: int) -> None:
        if target != self._replica.replicas:
            replica = self._replica
            await asyncio.to_thread(self._set_target, replica.app, replica.deployment, target)
            replica.scaled_to(target)

    def keep(self, count: int) -> None:
        # A reload reuses the deployment unchanged: its Serve replicas keep running.
        self._replica.scaled_to(count)

    async def close(self) -> None:
        return None


class ReplicaSet:
    """In-process and process replicas of one placement, made here by ``make`` (given a name;
    blocking: it loads a session, a process replica's child starts with the replica)."""

    provisioned = True
    per_worker = True

    def __init__(
        self, member: Member, tier: str, make: Callable[[str], Replica], drain_timeout_s: float
    ) -> None:
        self.member, self.tier = member, tier
        self.make = make
        self.drain_timeout_s = drain_timeout_s
        """How long a replica scaled away may finish its calls."""
        self.added: list[str] = []
        """Replicas it added, oldest first: the only ones it removes again."""
        self.retired = False
        """Set when a hot reload replaced this placement: replicas still starting are closed."""
        self._draining: set[asyncio.Task[None]] = set()

    def replicas(self) -> int:
        return len(self.member.serving(self.tier))

    def add(self, replica: Replica) -> None:
        """A replica it made (and started, or that starts with the member) takes calls."""
        self.member.add_replica(replica)
        self.added.append(replica.name)

    def keep(self, count: int) -> None:
        for name in self.member.new_names(self.tier, count - self.replicas()):
            self.add(self.make(name))

    async def scale(self, target: int) -> None:
        serving = self.member.serving(self.tier)
        if target > len(serving):
            await self._grow(self.member.new_names(self.tier, target - len(serving)))
        elif target < len(serving):
            self._shrink(serving, len(serving) - target)

    async def _grow(self, names: list[str]) -> None:
        """Start the new replicas concurrently (a process replica's child boots for a second
        or two); those that started join routing, in name order."""

        async def start(name: str) -> Replica:
            replica = await asyncio.to_thread(self.make, name)  # loads a session: off the loop
            try:
                await replica.start()
            except BaseException:
                await replica.close()
                raise
            return replica

        results = await asyncio.gather(*map(start, names), return_exceptions=True)
        started = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if self.retired:  # a reload replaced the member meanwhile
            await asyncio.gather(*(r.close() for r in started))
            return
        for replica in started:
            self.add(replica)
        for exc in failed:
            if not isinstance(exc, EnsembleError):
                raise exc
        if failed:
            raise failed[0]

    def _shrink(self, serving: list[Replica], count: int) -> None:
        """Drain ``count`` of the replicas it added, the newest first, each in the background
        (no call is lost); the configured ones stay."""
        added = sorted(
            (r for r in serving if r.name in self.added),
            key=lambda r: self.added.index(r.name),
            reverse=True,
        )
        for replica in added[:count]:
            self.added.remove(replica.name)
            task = asyncio.ensure_future(self.member.retire(replica.name, self.drain_timeout_s))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def close(self) -> None:
        self.retired = True
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)


@dataclass
class Fleet:
    """What the control plane manages for one config: a provisioner per placement, replica
    bounds and prices, and the autoscaling settings (None: no control loop decisions)."""

    provisioners: dict[Key, Provisioner] = field(default_factory=dict)
    bounds: dict[Key, tuple[int, int]] = field(default_factory=dict)
    """(min, max) replicas per placement, summed over the member's placements on the tier."""
    tier_prices: dict[str, float] = field(default_factory=dict)
    """Each tier's price of one replica for one hour."""
    tier_caps: dict[str, int] = field(default_factory=dict)
    """Tiers with a cap on replicas across their members."""
    autoscaling: AutoscalingConfig | None = None
    policy: AutoscalingPolicy | None = None

    async def close(self) -> None:
        """Stop every provisioner's work in progress (a reload replaced it, or the gateway
        stops)."""
        await asyncio.gather(*(p.close() for p in self.provisioners.values()))
