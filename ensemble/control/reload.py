"""Hot reload: validate a whole new config, build its models off the loop, swap atomically."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ensemble.config import GatewayConfig, load_config, parse_yaml
from ensemble.dispatcher import Dispatcher
from ensemble.errors import ConfigError, EnsembleError, ModelIntegrityError
from ensemble.links import Links
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.base import innermost
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.member import Member
from ensemble.replicas.ray_serve import RayReplica, RayRuntime
from ensemble.repository import Repository

log = logging.getLogger("ensemble.reload")
Key = tuple[str, str]
"""A placement: (member, tier)."""


@dataclass
class ReloadResult:
    """What a reload did; ``errors`` lists every problem when it was rejected."""

    ok: bool
    message: str
    errors: list[str] = field(default_factory=list)


class Reloader:
    """Applies new configs to a running gateway, one at a time; the old one serves until then."""

    def __init__(
        self,
        cfg: GatewayConfig,
        source: Path | None,
        engine: InProcessEngine,
        dispatcher: Dispatcher,
        metrics: GatewayMetrics,
        links: Links | None = None,
        ray: RayRuntime | None = None,
    ) -> None:
        self.cfg = cfg
        self._ray = ray
        self._links = links if links is not None else Links(cfg.tiers)
        self.source = source
        self._engine = engine
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self.retired: list[Repository] = []
        """Replaced repositories not closed yet (requests that started on them may still call
        their replicas): each is closed ``server.drain_timeout_s`` after it was replaced, or when
        the gateway stops."""
        self._closing: set[asyncio.Task[None]] = set()

    async def reload_file(self) -> ReloadResult:
        """Re-read the config file the gateway was started with (SIGHUP, empty admin PUT)."""
        if self.source is None:
            return self._reject(["the gateway was not started from a config file"])
        source = self.source
        return await self._apply(lambda: load_config(source), str(source))

    async def reload_text(self, text: str) -> ReloadResult:
        """Apply YAML sent to the admin API; relative paths resolve as in the config file."""
        base = self.source.parent if self.source else self.cfg.base_dir
        return await self._apply(
            lambda: parse_yaml(text, source="<admin request>", base_dir=base), "request body"
        )

    async def _apply(self, load: Callable[[], GatewayConfig], what: str) -> ReloadResult:
        async with self._lock:
            start = time.perf_counter()
            try:
                cfg = await asyncio.to_thread(load)
                _check_restart_only(self.cfg, cfg)
                # Loading sessions blocks for a while: never on the event loop.
                repository = await asyncio.to_thread(
                    Repository.from_config, cfg, self._engine, None, self._links, self._ray
                )
                # Before it starts, so the kept replicas start (and are checked) with the rest.
                await _keep_replica_counts(self.cfg, cfg, self._dispatcher.repository, repository)
            except ConfigError as exc:
                return self._reject(exc.errors)
            except ModelIntegrityError as exc:
                for member in exc.members:
                    self._metrics.record_integrity_failure(member)
                return self._reject(exc.problems)
            except (EnsembleError, OSError) as exc:
                return self._reject([str(exc)])
            # The new tiers' link settings; runtime overrides (a partition) are kept.
            self._links.configure(cfg.tiers)
            try:
                await repository.start()  # remote replicas' first checks; process children
            except EnsembleError as exc:  # a child that cannot start; it closed the others
                self._links.configure(self.cfg.tiers)
                if isinstance(exc, ModelIntegrityError):  # a child refused its model file
                    for member in exc.members:
                        self._metrics.record_integrity_failure(member)
                return self._reject([str(exc)])
            old = self._dispatcher.repository
            _carry_state(old, repository)
            self._dispatcher.repository = repository  # new requests see it from now on
            self.retired.append(old)
            closing = asyncio.create_task(self._close_later(old))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            self.cfg = cfg
            self._metrics.record_reload("success")
            took = time.perf_counter() - start
            message = f"reloaded {what} in {took:.2f} s: {', '.join(repository.names())}"
            log.info(message)
            return ReloadResult(True, message)

    async def _close_later(self, repository: Repository) -> None:
        # Stops its health checks and connection pools once requests begun on it are done.
        await asyncio.sleep(self.cfg.server.drain_timeout_s)
        self.retired.remove(repository)
        await repository.close()

    async def close(self) -> None:
        """Close every replaced repository now (the gateway is stopping)."""
        pending = list(self._closing)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for repository in self.retired:
            await repository.close()
        self.retired.clear()

    def _reject(self, errors: list[str]) -> ReloadResult:
        self._metrics.record_reload("failure")
        log.warning("config reload rejected; the previous config keeps serving: %s", errors)
        return ReloadResult(False, f"invalid config: {len(errors)} error(s)", errors)


def _check_restart_only(old: GatewayConfig, new: GatewayConfig) -> None:
    """Listening addresses, limits, the thread pool and the Ray application are fixed for a
    process's life (a `ray` placement that changes is caught when its replica is built)."""
    changed = [
        f"{section}.{key}: {getattr(before, key)!r} -> {getattr(after, key)!r} needs a restart"
        for section, before, after in (
            ("server", old.server, new.server),
            ("ray", old.ray, new.ray),
        )
        for key in type(before).model_fields
        if getattr(before, key) != getattr(after, key)
    ]
    if changed:
        raise ConfigError("reload", changed)


def _carry_state(old: Repository, new: Repository) -> None:
    """Learned selection state (bandit weights) survives a reload of an unchanged profile."""
    for name, ensemble in new.ensembles.items():
        before = old.ensembles.get(name)
        if before is None or set(before.members) != set(ensemble.members):
            continue
        for profile_name, profile in ensemble.profiles.items():
            previous = before.profiles.get(profile_name)
            if previous is not None and previous.spec == profile.spec:
                profile.state = previous.state


async def _keep_replica_counts(
    old_cfg: GatewayConfig, new_cfg: GatewayConfig, old: Repository, new: Repository
) -> None:
    """Give every placement the reload leaves unchanged the replicas it has now (clamped to its
    new bounds), so capacity the control loop added is not lost: the new repository would
    otherwise start at each placement's minimum and serve a busy member with fewer replicas
    until the loop scaled it up again. Placements that changed, and new ones, start at their
    minimum as before.

    In-process and process placements get more replicas from the new member's grower (made
    here, started with the rest by ``Repository.start``; listed in ``Member.added``, so the
    loop may scale them away again); a Ray deployment, which a reload reuses unchanged and
    whose Serve replicas keep running, has its new replica object told its current count.
    The old replicas are not handed over: they stay with the old repository, whose requests
    in flight may still need them, and are closed with it."""
    unchanged = _unchanged_placements(old_cfg, new_cfg)
    grow: list[tuple[Member, str, str]] = []
    for key, had in _replica_counts(old).items():
        member = new.members.get(key[0])
        bounds = new.bounds.get(key)
        if key not in unchanged or member is None or bounds is None:
            continue
        keep = min(max(had, bounds[0]), bounds[1])
        tier = key[1]
        if tier in member.growers:
            more = keep - len(member.serving(tier))
            grow += [(member, tier, name) for name in member.new_names(tier, more)]
        elif (ray := _ray_replica(member, tier)) is not None:
            ray.scaled_to(keep)
        if keep > bounds[0]:
            log.info("reload keeps %s@%s at %d replicas (it had %d)", *key, keep, had)
    if grow:
        # Loading sessions blocks for a while: never on the event loop.
        await asyncio.to_thread(_grow, grow)


def _grow(wanted: list[tuple[Member, str, str]]) -> None:
    """Make each (member, tier, name) replica and add it (blocking: in-process ones load a
    session; a process replica's child starts with the repository)."""
    for member, tier, name in wanted:
        member.add_replica(member.growers[tier](name))


def _replica_counts(repository: Repository) -> dict[Key, int]:
    """Replicas each provisioned placement has now: the in-process and process replicas
    serving (draining ones are on their way out), a Ray deployment's count as last set."""
    counts: dict[Key, int] = {}
    for key in repository.bounds:
        member = repository.members.get(key[0])
        if member is None:
            continue
        if key[1] in member.growers:
            counts[key] = len(member.serving(key[1]))
        elif (ray := _ray_replica(member, key[1])) is not None:
            counts[key] = ray.replicas
    return counts


def _ray_replica(member: Member, tier: str) -> RayReplica | None:
    """The one Ray deployment's replica of a member on ``tier`` (None: none, or several, whose
    counts the loop does not tell apart), without its fault and link wrappers."""
    found = [r for r in map(innermost, member.replicas) if r.tier == tier]
    rays = [r for r in found if isinstance(r, RayReplica)]
    return rays[0] if len(rays) == 1 and tier in member.scalers else None


def _unchanged_placements(old: GatewayConfig, new: GatewayConfig) -> set[Key]:
    """Placements defined alike in both configs but for their replica bounds: the same model
    file, card and outputs, and the same placements on the tier (backend, sizing, timeouts,
    faults)."""
    before = _placement_definitions(old)
    return {key for key, spec in _placement_definitions(new).items() if before.get(key) == spec}


def _placement_definitions(cfg: GatewayConfig) -> dict[Key, object]:
    definitions: dict[Key, object] = {}
    for ensemble in cfg.ensembles:
        for member in ensemble.members:
            own = (
                cfg.resolve(member.model),
                cfg.resolve(member.card) if member.card else None,
                member.model_dump(exclude={"name", "model", "card", "placement"}),
            )
            for tier in dict.fromkeys(p.tier for p in member.placement):
                places = [
                    p.model_dump(exclude={"replicas"}) for p in member.placement if p.tier == tier
                ]
                definitions[(member.name, tier)] = (own, places)
    return definitions
