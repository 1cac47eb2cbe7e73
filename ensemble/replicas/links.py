"""Emulated network links between the gateway and its tiers: delay, jitter, loss, bandwidth,
partition (in userspace: the kernel here has no netem; in production links are real and off)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.config import LinkConfig, TierConfig
from ensemble.errors import MemberFailed
from ensemble.replicas.base import Replica

Probe = Callable[[], Awaitable[str | None]]

OVERRIDABLE = (
    "partitioned",
    "delay_ms",
    "jitter_ms",
    "loss",
    "loss_mode",
    "drop_timeout_ms",
    "bandwidth_mbps",
)
"""Settings the admin API may change at runtime (``emulate`` and ``seed`` come from config)."""


@dataclass(frozen=True, slots=True)
class LinkReading:
    """One emulated link as the metrics see it."""

    tier: str
    partitioned: bool
    delay_s: float
    loss: float
    failures: Mapping[str, int]
    changes: int


class Link:
    """One tier's emulated link: its configured settings, runtime overrides and counters.

    Every leg of a call sleeps the one-way delay (``delay_ms`` plus uniform jitter, never below
    0) plus its bytes' transfer time at ``bandwidth_mbps``; a share ``loss`` of calls is dropped
    (``timeout``: fails after ``drop_timeout_ms``, capped by the call's timeout) or reset
    (``reset``: fails after one one-way delay); a partitioned link refuses every call and health
    check at once, so nothing waits on a tier that cannot answer.
    """

    def __init__(
        self,
        tier: str,
        config: LinkConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.tier = tier
        self.config = config
        """The settings from the config file."""
        self.overrides: dict[str, Any] = {}
        """Runtime changes made through the admin API (kept across config reloads)."""
        self.settings = config
        """What the link does now: the config with the overrides applied."""
        self.failures = {"dropped": 0, "reset": 0, "partitioned": 0}
        self.changes = 0
        self.links: Links | None = None
        """The gateway's links it belongs to (their `observe` hears of its calls' time)."""
        self._clock = clock
        self._rng = rng or random.Random(config.seed)

    @property
    def emulated(self) -> bool:
        return self.config.emulate

    def configure(self, config: LinkConfig) -> None:
        """A reloaded config's settings; runtime overrides stay until cleared."""
        self.config = config
        self.settings = config.model_copy(update=self.overrides)

    def override(self, changes: Mapping[str, Any]) -> LinkConfig:
        """Apply runtime changes (keys from OVERRIDABLE); raises ValueError or pydantic's
        ValidationError, leaving the link as it was, when they are not valid."""
        unknown = sorted(set(changes) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(
                f"cannot change {', '.join(unknown)} at runtime; allowed: {', '.join(OVERRIDABLE)}"
            )
        overrides = {**self.overrides, **changes}
        settings = LinkConfig.model_validate({**self.config.model_dump(), **overrides})
        self.overrides = {key: getattr(settings, key) for key in overrides}
        self.settings = settings
        self.changes += 1
        return settings

    def clear(self) -> LinkConfig:
        """Drop every runtime override: back to the config's settings."""
        self.overrides = {}
        self.settings = self.config
        self.changes += 1
        return self.settings

    def change(self, changes: Mapping[str, Any] | None) -> LinkConfig:
        """``override(changes)``, or ``clear()`` for None (the admin API's PUT and DELETE)."""
        return self.clear() if changes is None else self.override(changes)

    def copy(self) -> Link:
        """A copy to try a change on: changing it leaves this link as it is."""
        trial = object.__new__(Link)
        trial.__dict__.update(self.__dict__)
        trial.failures = dict(self.failures)
        return trial

    def one_way_s(self, nbytes: int) -> float:
        """How long ``nbytes`` take from one end to the other now (a fresh jitter draw)."""
        settings = self.settings
        delay_ms = settings.delay_ms
        if settings.jitter_ms:
            delay_ms += self._rng.uniform(-settings.jitter_ms, settings.jitter_ms)
        seconds = max(0.0, delay_ms) / 1e3
        if settings.bandwidth_mbps is not None and nbytes:
            seconds += nbytes * 8 / (settings.bandwidth_mbps * 1e6)
        return seconds

    async def send(self, nbytes: int, what: str, timeout_s: float | None = None) -> None:
        """The request's leg to the tier; MemberFailed when partitioned, dropped or reset."""
        settings = self.settings
        self._refuse_if_partitioned(what)
        if settings.loss and self._rng.random() < settings.loss:
            if settings.loss_mode == "reset":
                self.failures["reset"] += 1
                await self._clock.sleep(self.one_way_s(0))
                raise MemberFailed(f"{what}: connection reset (emulated link to {self.tier})")
            self.failures["dropped"] += 1
            wait_s = settings.drop_timeout_ms / 1e3
            if timeout_s is not None:
                wait_s = min(wait_s, timeout_s)
            await self._clock.sleep(wait_s)
            raise MemberFailed(
                f"{what}: no answer within {wait_s:g} s (call dropped by the emulated link to "
                f"{self.tier})"
            )
        await self._clock.sleep(self.one_way_s(nbytes))

    async def receive(self, nbytes: int, what: str) -> None:
        """The answer's leg back; MemberFailed when the link was cut meanwhile."""
        self._refuse_if_partitioned(what)
        await self._clock.sleep(self.one_way_s(nbytes))

    async def check(self, probe: Probe) -> str | None:
        """A health check across the link: None when it passed, else why not."""
        try:
            await self.send(0, "health check")
            problem = await probe()
            await self.receive(0, "health check")
        except MemberFailed as exc:
            return exc.message
        return problem

    def _refuse_if_partitioned(self, what: str) -> None:
        if self.settings.partitioned:
            self.failures["partitioned"] += 1
            raise MemberFailed(f"{what}: tier {self.tier!r} is partitioned (emulated link)")

    def describe(self) -> dict[str, Any]:
        """The admin API's view: what the link does now, the overrides, the counters."""
        return {
            "emulate": self.emulated,
            **{key: getattr(self.settings, key) for key in OVERRIDABLE},
            "overrides": dict(self.overrides),
            "failures": dict(self.failures),
        }

    def reading(self) -> LinkReading:
        settings = self.settings
        return LinkReading(
            self.tier,
            settings.partitioned,
            settings.delay_ms / 1e3,
            settings.loss,
            dict(self.failures),
            self.changes,
        )


class Links:
    """The gateway's links by tier; they outlive config reloads (a partition is the network's
    state, not the config's), so a reload keeps runtime overrides."""

    def __init__(self, tiers: Mapping[str, TierConfig], *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._links: dict[str, Link] = {}
        self.observe: Callable[[str, str, float], None] | None = None
        """Told the time each call of a member spent on a link: (member, tier, seconds)."""
        self.configure(tiers)

    def link(self, tier: str, config: LinkConfig) -> Link:
        """The tier's link, made with ``config`` when the tier is new (existing links keep their
        settings until ``configure``, so a reload being built changes nothing yet)."""
        found = self._links.get(tier)
        if found is None:
            found = self._links[tier] = Link(tier, config, clock=self._clock)
            found.links = self
        return found

    def configure(self, tiers: Mapping[str, TierConfig]) -> None:
        """Take a (reloaded) config's tiers: new settings, overrides kept, removed tiers gone."""
        for tier, cfg in tiers.items():
            self.link(tier, cfg.link).configure(cfg.link)
        for tier in set(self._links) - set(tiers):
            del self._links[tier]

    def get(self, tier: str) -> Link | None:
        return self._links.get(tier)

    def __iter__(self) -> Iterator[Link]:
        # A copy: a reload being built in a worker thread may add a tier meanwhile.
        return iter(list(self._links.values()))

    def readings(self) -> list[LinkReading]:
        """Emulated links, for the metrics (read at scrape time)."""
        return [link.reading() for link in self if link.emulated]


def round_trip_s(replica: Replica) -> float:
    """The time the emulated links under ``replica`` (and its wrappers) add to a call now: both
    legs' ``delay_ms``, plus the transfer time of the last call's bytes at the link's
    bandwidth: time a call spends on the wire rather than on the replica."""
    total = 0.0
    found: Replica | None = replica
    while found is not None:
        if isinstance(found, LinkedReplica) and found.link.emulated:
            settings = found.link.settings
            total += 2 * settings.delay_ms / 1e3
            if settings.bandwidth_mbps is not None:
                total += found.wire_bytes * 8 / (settings.bandwidth_mbps * 1e6)
        found = getattr(found, "inner", None)
    return total


def link_of(replica: Replica) -> Link | None:
    """The emulated link ``replica`` (or a replica it wraps) is reached across, if any."""
    found: Replica | None = replica
    while found is not None:
        if isinstance(found, LinkedReplica) and found.link.emulated:
            return found.link
        found = getattr(found, "inner", None)
    return None


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes a call's tensors take on the wire (close enough: their raw contents)."""
    return sum(int(array.nbytes) for array in arrays.values())


class LinkedReplica:
    """A replica reached across an emulated link: each call pays both legs and may be lost.

    In-process replicas are unready while their link is partitioned; a remote replica's health
    checks cross the link themselves (``RemoteReplica.link``), so its readiness follows them.
    """

    def __init__(
        self,
        inner: Replica,
        link: Link,
        *,
        timeout_s: float | None = None,
        health_checked: bool = False,
    ) -> None:
        self.inner = inner
        self.link = link
        self.name = inner.name
        self.tier = inner.tier
        self.timeout_s = timeout_s
        self._health_checked = health_checked
        self.wire_bytes = 0
        """Bytes the last call sent and received (what a bandwidth change costs the next)."""
        self.owner: str | None = None
        """The member whose calls' link time is reported (the gateway's metrics)."""

    def ready(self) -> bool:
        if not self._health_checked and self.link.settings.partitioned:
            return False
        return self.inner.ready()

    def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> Awaitable[dict[str, np.ndarray]]:
        return self._call(feed, outputs)

    async def _call(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        what = f"replica {self.name}"
        link = self.link
        clock = link._clock
        sent = payload_bytes(feed)
        started = clock.now()
        await link.send(sent, what, self.timeout_s)
        arrived = clock.now()
        result = await self.inner.infer(feed, outputs)
        answered = clock.now()
        received = payload_bytes(result)
        self.wire_bytes = sent + received
        await link.receive(received, what)
        hub = link.links
        if hub is not None and hub.observe is not None and self.owner is not None:
            hub.observe(self.owner, link.tier, arrived - started + clock.now() - answered)
        return result

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()
