"""The control loop: its own task on its own interval, never on the request path.

Every ``interval_s`` it samples each member placement (calls in flight on its tier's replicas,
calls started, recent p95), averages over ``window_s``, asks the config's autoscaling policy
for targets (``decide(context, state) -> (decision, state)``), and hands them to each
placement's provisioner (`ensemble.control.provisioning`): in-process and process replicas are
made or drained here, a Ray deployment is resized by Serve, remote servers stay as they are.
Every decision is logged and exported as metrics (``ensemble_autoscaler_replicas``,
``ensemble_autoscaler_decisions``). It also accounts replica-seconds and their price.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from ensemble.control.provisioning import Fleet, Key, Provisioner
from ensemble.errors import EnsembleError, ModelIntegrityError
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.base import Replica
from ensemble.replicas.links import round_trip_s
from ensemble.replicas.member import Member
from ensemble.replicas.stats import ReplicaStats
from policies.base import AutoscalingPolicy, PlacementLoad, ScalingContext

log = logging.getLogger("ensemble.control")


class Peers(Protocol):
    """The gateway's other workers, as the control loop sees them: one leader observes all of
    them, decides, and publishes the targets every worker applies (``apply``)."""

    @property
    def leads(self) -> bool:
        """This worker decides (it is the lowest-numbered live worker)."""
        ...

    @property
    def workers(self) -> int: ...

    async def loads(self) -> list[tuple[PlacementLoad, ...]]:
        """Every other live worker's own observation (``ControlLoop.observe``)."""
        ...

    def publish(self, targets: dict[Key, int]) -> None:
        """Send the targets to every worker (this one too), in the order of shared changes."""
        ...


class ControlLoop:
    """Observes and scales the current config's fleet (read at every tick: reloads swap it).

    With ``peers`` (a gateway of several workers), only the leader decides: from the load of
    every worker (per worker for placements each worker holds, in total for shared ones), and
    every worker scales its own replicas to the targets; shared placements scale once, by the
    leader."""

    def __init__(
        self,
        fleet: Callable[[], Fleet],
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        peers: Peers | None = None,
    ) -> None:
        self._fleet = fleet
        self.peers = peers
        self._applying = asyncio.Lock()
        self._metrics = metrics
        self._clock = clock
        self._policy: AutoscalingPolicy | None = None
        self._state: Any = None
        self._samples: dict[Key, deque[tuple[float, float, int, int]]] = {}
        self._seen: dict[Key, dict[str, tuple[int, int]]] = {}
        """Per placement: each serving replica's (calls, failures) counters when last seen."""
        self._recorded: dict[Key, dict[str, deque[tuple[float, int]]]] = {}
        """Per placement and replica: (tick, latencies recorded so far) over the window."""
        self._totals: dict[Key, tuple[int, int]] = {}
        """Per placement: calls and failures counted so far, never decreasing (a replica that
        leaves takes its counters along, not the calls it served)."""
        """Per placement: (time, calls in flight, calls started and failed so far)."""
        self.replicas: dict[Key, int] = {}
        """Replicas each placement has, as its provisioner counts them."""
        self.desired: dict[Key, int] = {}
        self._last_account: float | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.autoscaler = lambda: [
            (member, tier, self.replicas[(member, tier)], self.desired.get((member, tier)))
            for member, tier in list(self.replicas)
        ]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="control loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            settings = self._fleet().autoscaling
            await asyncio.sleep(settings.interval_s if settings is not None else 1.0)
            try:
                await self.tick()
            except Exception:  # a policy or provisioning bug must not end the loop
                log.exception("control loop tick failed")

    async def tick(self) -> None:
        """One observation, decision and provisioning step."""
        peers = self.peers
        if peers is not None and not peers.leads:
            return  # the leader observes this worker through ``observe`` and decides
        fleet = self._fleet()
        now = self._clock()
        self._account(fleet, now, 1 if peers is None else peers.workers)
        policy, settings = fleet.policy, fleet.autoscaling
        if policy is None or settings is None:
            return
        if policy is not self._policy:  # a new config: start from the policy's own state
            self._policy, self._state = policy, policy.initial_state()
        loads = self._observe(fleet, now, settings.window_s)
        if peers is not None:
            loads = _merged(fleet, loads, await peers.loads())
        ctx = ScalingContext(now, loads, fleet.tier_caps, settings.window_s)
        decision, self._state = policy.decide(ctx, self._state)
        for key, target in decision.targets.items():
            if self.desired.get(key) != target:
                provisioner = fleet.provisioners.get(key)
                self._log_decision(key, target, decision.reasons.get(key), provisioner)
            self.desired[key] = target
        for key in list(self.desired):
            if key not in decision.targets:
                del self.desired[key]
        if peers is not None:
            peers.publish(dict(decision.targets))
        else:
            await self.apply(decision.targets)

    def observe(self) -> tuple[PlacementLoad, ...]:
        """This worker's own load now (the leader asks each worker at every tick)."""
        fleet = self._fleet()
        settings = fleet.autoscaling
        if settings is None:
            return ()
        return self._observe(fleet, self._clock(), settings.window_s)

    async def apply(self, targets: Mapping[Key, int]) -> None:
        """Scale this worker's placements to ``targets`` (shared ones only on the leader),
        one set of targets at a time, in the order they were decided."""
        async with self._applying:
            fleet = self._fleet()
            leads = self.peers is None or self.peers.leads
            for key, target in targets.items():
                provisioner = fleet.provisioners.get(key)
                if provisioner is None:
                    continue
                if provisioner.per_worker or leads:
                    try:
                        await provisioner.scale(target)
                    except EnsembleError as exc:  # e.g. a replica process that could not start
                        if isinstance(exc, ModelIntegrityError):  # the file changed since
                            self._metrics.record_integrity_failure(key[0])
                        log.warning("autoscaler: %s@%s: could not provision: %s", *key, exc)
                self.replicas[key] = provisioner.replicas()

    def _log_decision(
        self, key: Key, target: int, reason: str | None, provisioner: Provisioner | None
    ) -> None:
        direction = "up" if target > self.replicas.get(key, 0) else "down"
        self._metrics.scaling_decisions[(*key, direction)] += 1
        log.info(
            "autoscaler: %s@%s %d -> %d replicas (%s)%s",
            key[0],
            key[1],
            self.replicas.get(key, 0),
            target,
            reason or "no reason given",
            "" if provisioner is not None and provisioner.provisioned else "; static: not applied",
        )

    def _counted(
        self, key: Key, serving: list[Replica], stats: list[ReplicaStats]
    ) -> tuple[int, int]:
        """The placement's calls and failures so far: the replicas' counter increases since
        the last look, added up."""
        seen = self._seen.get(key, {})
        calls, failures = self._totals.get(key, (0, 0))
        now: dict[str, tuple[int, int]] = {}
        for replica, stat in zip(serving, stats, strict=True):
            before_calls, before_failures = seen.get(replica.name, (0, 0))
            if stat.calls < before_calls:  # a new replica under an old name
                before_calls = before_failures = 0
            calls += stat.calls - before_calls
            failures += max(0, stat.failures - before_failures)
            now[replica.name] = (stat.calls, stat.failures)
        self._seen[key] = now
        self._totals[key] = (calls, failures)
        return calls, failures

    def _window_p95s(
        self,
        key: Key,
        serving: list[Replica],
        stats: list[ReplicaStats],
        now: float,
        window_s: float,
    ) -> list[float]:
        """Each replica's p95 over the calls it finished within the window (the last 8 when
        fewer): a burst the window has forgotten no longer counts."""
        before = self._recorded.get(key, {})
        kept: dict[str, deque[tuple[float, int]]] = {}
        p95s = []
        for replica, stat in zip(serving, stats, strict=True):
            marks = before.get(replica.name, deque())
            if marks and stat.recorded < marks[-1][1]:  # a new replica under an old name
                marks.clear()
            marks.append((now, stat.recorded))
            while now - marks[0][0] > window_s:
                marks.popleft()
            kept[replica.name] = marks
            p95 = stat.p95_of_last(stat.recorded - marks[0][1])
            if p95 is not None:
                p95s.append(p95)
        self._recorded[key] = kept
        return p95s

    def _account(self, fleet: Fleet, now: float, workers: int) -> None:
        """Replica-seconds since the last tick, and their price, per placement (each of the
        ``workers`` holds its own replicas of a per-worker placement)."""
        last, self._last_account = self._last_account, now
        if last is None or now <= last:
            return
        held = self._metrics.replica_seconds
        for (member_name, tier), provisioner in fleet.provisioners.items():
            count = provisioner.replicas() * (workers if provisioner.per_worker else 1)
            if count:
                seconds = count * (now - last)
                held[(member_name, tier)] += seconds
                price = fleet.tier_prices.get(tier, 0.0)
                if price:
                    self._metrics.spend[(tier, "replicas")] += seconds * price / 3600

    def _observe(self, fleet: Fleet, now: float, window_s: float) -> tuple[PlacementLoad, ...]:
        loads = []
        for (member_name, tier), (low, high) in fleet.bounds.items():
            provisioner = fleet.provisioners.get((member_name, tier))
            if provisioner is None:
                continue
            member = provisioner.member
            serving = member.serving(tier)
            stats = [member.stats[r.name] for r in serving]
            inflight = float(sum(s.outstanding for s in stats))
            key = (member_name, tier)
            calls, failures = self._counted(key, serving, stats)
            samples = self._samples.setdefault(key, deque())
            samples.append((now, inflight, calls, failures))
            while samples and now - samples[0][0] > window_s:
                samples.popleft()
            span = now - samples[0][0]
            rate = (calls - samples[0][2]) / span if span > 0 else 0.0
            failing = (failures - samples[0][3]) / span if span > 0 else 0.0
            p95s = self._window_p95s(key, serving, stats, now, window_s)
            trips = [round_trip_s(r) for r in serving]
            replicas = self.replicas[key] = provisioner.replicas()
            ready = sum(
                1
                for r, s in zip(serving, stats, strict=True)
                if r.ready() and s.breaker.ejected_until is None
            )
            loads.append(
                PlacementLoad(
                    member_name,
                    tier,
                    replicas,
                    low,
                    high,
                    sum(x[1] for x in samples) / len(samples),
                    rate,
                    # A p95 is of recent calls: with none in the window it is stale, not news.
                    max(p95s) * 1e3 if p95s and calls > samples[0][2] else None,
                    ready_replicas=min(ready, replicas),
                    failures_rps=failing,
                    service_ms=_service_ms(member, trips, stats),
                    link_ms=max(trips, default=0.0) * 1e3,
                    cost_per_replica_hour=fleet.tier_prices.get(tier, 0.0),
                    other_tiers=tuple(t for m, t in fleet.bounds if m == member_name and t != tier),
                )
            )
        return tuple(loads)


def _merged(
    fleet: Fleet, mine: tuple[PlacementLoad, ...], others: list[tuple[PlacementLoad, ...]]
) -> tuple[PlacementLoad, ...]:
    """The leader's loads joined with the other workers': a placement each worker holds is
    judged per worker (the average worker's load on its own replicas, the worst p95), a shared
    one on the calls of all workers together."""
    merged = []
    for load in mine:
        seen = [o for loads in others for o in loads if o.key == load.key]
        if not seen:
            merged.append(load)
            continue
        provisioner = fleet.provisioners.get(load.key)
        every = [load, *seen]
        share = len(every) if provisioner is not None and provisioner.per_worker else 1
        p95s = [x.p95_ms for x in every if x.p95_ms is not None]
        merged.append(
            replace(
                load,
                outstanding=sum(x.outstanding for x in every) / share,
                arrival_rps=sum(x.arrival_rps for x in every) / share,
                failures_rps=sum(x.failures_rps for x in every) / share,
                p95_ms=max(p95s) if p95s else None,
            )
        )
    return tuple(merged)


def _service_ms(member: Member, trips: list[float], stats: list[ReplicaStats]) -> float | None:
    """How long one call holds an idle replica: the fastest tenth of recent calls (those that
    met no queue) on the quickest replica, less its emulated link's round trip (``trips``,
    per replica: time on the wire holds no replica), what the replicas really take here (an emulated
    device, a busy machine); never below the member card's batch-1 p50; the card alone before
    calls."""
    card = member.card
    one = card.latency_ms.get("batch_1") if card is not None else None
    floor = float(one.p50_ms) if one is not None else None
    fast = [
        max(0.0, s.fast_s - trip)
        for trip, s in zip(trips, stats, strict=True)
        if s.fast_s is not None
    ]
    if not fast:
        return floor
    live = min(fast) * 1e3
    return live if floor is None else max(floor, live)
