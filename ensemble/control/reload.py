"""Hot reload: validate a whole new config, build its models off the loop, swap atomically."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ensemble.config import GatewayConfig, load_config, parse_yaml
from ensemble.control.build import Built, build
from ensemble.control.provisioning import Fleet, Key
from ensemble.control.ray_runtime import RayRuntime
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.errors import ConfigError, EnsembleError, ModelIntegrityError
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.links import Links
from ensemble.repository import Repository

log = logging.getLogger("ensemble.reload")


@dataclass
class ReloadResult:
    """What a reload did; ``errors`` lists every problem when it was rejected."""

    ok: bool
    message: str
    errors: list[str] = field(default_factory=list)
    workers: dict[int, str] | None = None
    """A gateway of several workers: what each did (applied, rolled back, or why not)."""


class Reloader:
    """Applies new configs to a running gateway, one at a time; the old one serves until then."""

    def __init__(
        self,
        cfg: GatewayConfig,
        source: Path | None,
        engine: InProcessEngine,
        dispatcher: Dispatcher,
        fleet: Fleet,
        metrics: GatewayMetrics,
        links: Links | None = None,
        ray: RayRuntime | None = None,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        """The current config's fleet (the control loop reads it at every tick)."""
        self._ray = ray
        self._links = links if links is not None else Links(cfg.tiers)
        self.source = source
        self._engine = engine
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self.retired: list[Built] = []
        """Replaced repositories not closed yet (requests that started on them may still call
        their replicas): each is closed ``server.drain_timeout_s`` after it was replaced, or when
        the gateway stops."""
        self._closing: set[asyncio.Task[None]] = set()
        self._prepared: tuple[tuple[GatewayConfig, Built], str, float] | None = None
        """What ``prepare`` built, until ``commit`` or ``abort``."""

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
            prepared = await self._prepare(load)
            if isinstance(prepared, ReloadResult):
                return prepared
            return await self._commit(prepared, what, start)

    async def prepare(self, text: str, source: str) -> list[str]:
        """The first half of a reload all of a gateway's workers make together: validate and
        build ``text`` and start its replicas, without serving it. Returns the problems (the
        old config stays, nothing to undo) or [] and holds the reload lock until ``commit`` or
        ``abort``."""
        await self._lock.acquire()
        base = self.cfg.base_dir if self.source is None else self.source.parent
        prepared = await self._prepare(lambda: parse_yaml(text, source=source, base_dir=base))
        if isinstance(prepared, ReloadResult):
            self._lock.release()
            return prepared.errors or [prepared.message]
        self._prepared = (prepared, source, time.perf_counter())
        return []

    async def commit(self) -> str:
        """Serve the config ``prepare`` built (nothing can fail now)."""
        if self._prepared is None:
            return "nothing prepared"
        (cfg, built), what, start = self._prepared
        self._prepared = None
        try:
            return (await self._commit((cfg, built), what, start)).message
        finally:
            self._lock.release()

    async def abort(self) -> None:
        """Drop what ``prepare`` built: another worker could not apply the config."""
        if self._prepared is None:
            return
        (_, built), _, _ = self._prepared
        self._prepared = None
        try:
            self._links.configure(self.cfg.tiers)
            await built.fleet.close()
            await built.repository.close()
            self._metrics.record_reload("failure")
        finally:
            self._lock.release()

    async def _prepare(
        self, load: Callable[[], GatewayConfig]
    ) -> tuple[GatewayConfig, Built] | ReloadResult:
        """A new config validated, built and started, or why not (the old one unchanged)."""
        try:
            cfg = await asyncio.to_thread(load)
            _check_restart_only(self.cfg, cfg)
            # Loading sessions blocks for a while: never on the event loop.
            built = await asyncio.to_thread(build, cfg, self._engine, None, self._links, self._ray)
            # Before it starts, so the kept replicas start (and are checked) with the rest.
            await _keep_replica_counts(self.cfg, cfg, self.fleet, built.fleet)
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
            await built.repository.start()  # remote replicas' first checks; children
        except EnsembleError as exc:  # a child that cannot start; it closed the others
            self._links.configure(self.cfg.tiers)
            if isinstance(exc, ModelIntegrityError):  # a child refused its model file
                for member in exc.members:
                    self._metrics.record_integrity_failure(member)
            return self._reject([str(exc)])
        return cfg, built

    async def _commit(
        self, prepared: tuple[GatewayConfig, Built], what: str, start: float
    ) -> ReloadResult:
        cfg, built = prepared
        old = Built(self._dispatcher.repository, self.fleet)
        repository = built.repository
        _carry_state(old.repository, repository, _unchanged_placements(self.cfg, cfg))
        self._dispatcher.repository = repository  # new requests see it from now on
        self.fleet = built.fleet
        await old.fleet.close()  # replicas it is still starting or draining: not its own
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

    async def _close_later(self, old: Built) -> None:
        # Stops its health checks and connection pools once requests begun on it are done.
        await asyncio.sleep(self.cfg.server.drain_timeout_s)
        self.retired.remove(old)
        await old.repository.close()

    async def close(self) -> None:
        """Close every replaced repository now (the gateway is stopping)."""
        pending = list(self._closing)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for old in self.retired:
            await old.repository.close()
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


def _carry_state(old: Repository, new: Repository, unchanged: set[Key]) -> None:
    """What an unchanged profile learned (its learning cell: bandit weights) survives a
    reload; its hedge and retry budgets start afresh with the new config. A rollout the
    reload leaves as it was keeps its evidence and its decision (a promoted version keeps
    serving). An ``unchanged`` placement keeps its live estimates (service time quantiles,
    error rate), an ensemble watching the same inputs against the same reference its drift
    window."""
    for member, tier in unchanged:
        was, now = old.members.get(member), new.members.get(member)
        if was is not None and now is not None and was.version == now.version:
            carried = was.estimates.get(tier)
            if carried is not None:
                now.estimates[tier] = carried
    for name, model in new.ensembles.items():
        watched = old.ensembles[name].watch if name in old.ensembles else None
        if model.watch is not None and watched is not None:
            model.watch.carry(watched)
    for name, versions in new.versions.items():
        earlier = old.versions.get(name)
        if earlier is not None:
            versions.carry(earlier)
            new.serve_default(name)
    for name, ensemble in new.ensembles.items():
        before = old.ensembles.get(name)
        if before is None or set(before.members) != set(ensemble.members):
            continue
        for profile_name, profile in ensemble.profiles.items():
            previous = before.profiles.get(profile_name)
            if previous is not None and previous.spec == profile.spec:
                profile.learning = previous.learning


async def _keep_replica_counts(
    old_cfg: GatewayConfig, new_cfg: GatewayConfig, old: Fleet, new: Fleet
) -> None:
    """Give every placement the reload leaves unchanged the replicas it has now (clamped to its
    new bounds), so capacity the control loop added is not lost: the new config's placements
    would otherwise start at their minimum and serve a busy member with fewer replicas until
    the loop scaled them up again. Placements that changed, and new ones, start at their
    minimum as before.

    Each new provisioner ``keep``s the count: in-process and process placements make more
    replicas (started with the rest by ``Repository.start``; the loop may scale them away
    again); a Ray deployment, which a reload reuses unchanged and whose Serve replicas keep
    running, is told its current count. The old replicas are not handed over: they stay with
    the old repository, whose requests in flight may still need them, and are closed with it."""
    unchanged = _unchanged_placements(old_cfg, new_cfg)
    keeps: list[tuple[Key, int]] = []
    for key, before in old.provisioners.items():
        bounds = new.bounds.get(key)
        if key not in unchanged or key not in new.provisioners or bounds is None:
            continue
        had = before.replicas()
        keep = min(max(had, bounds[0]), bounds[1])
        keeps.append((key, keep))
        if keep > bounds[0]:
            log.info("reload keeps %s@%s at %d replicas (it had %d)", *key, keep, had)
    if keeps:
        # Loading sessions blocks for a while: never on the event loop.
        await asyncio.to_thread(_keep, new, keeps)


def _keep(fleet: Fleet, keeps: list[tuple[Key, int]]) -> None:
    for key, count in keeps:
        fleet.provisioners[key].keep(count)


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
