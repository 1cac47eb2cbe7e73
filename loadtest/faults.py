"""Fault injection: timed events handled by hooks registered by name (pause, partition, ...)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ensemble.auth import ADMIN_TOKEN_ENV


@dataclass(frozen=True)
class FaultEvent:
    """One scheduled fault: when (seconds after the start), which hook, its validated params."""

    at_s: float
    name: str
    params: BaseModel


@dataclass(frozen=True)
class Mark:
    """A moment worth showing in the report and on the plots."""

    at_s: float
    name: str
    message: str


class ReplicaControl(Protocol):
    """A replica server process the caller started (never anyone else's), for replica faults."""

    name: str

    @property
    def running(self) -> bool:
        """Its process is alive."""
        ...

    def kill(self) -> int:
        """SIGKILL the process; returns the pid killed."""
        ...

    async def restart(self) -> None:
        """Start it again on the same ports; returns once it says it is ready."""
        ...

    def set_delay_ms(self, delay_ms: float) -> None:
        """Delay every request to it by this much on its way in (0: none); ValueError when
        nothing sits in front of it that can."""
        ...


@dataclass
class FaultContext:
    """What hooks may touch: the harness-started gateway (if any), the run clock, the marks,
    the gateway's URL (for its admin API), and replica processes the caller started."""

    gateway_pid: int | None
    elapsed: Callable[[], float]
    marks: list[Mark] = field(default_factory=list)
    gateway_url: str | None = None
    replicas: dict[str, ReplicaControl] = field(default_factory=dict)

    def replica(self, name: str) -> ReplicaControl:
        """The caller-started replica ``name``; ValueError when there is none of that name."""
        if name not in self.replicas:
            known = ", ".join(sorted(self.replicas)) or "none (run it through loadtest.resilience)"
            raise ValueError(f"no replica {name!r} started by the harness; known: {known}")
        return self.replicas[name]

    def mark(self, name: str, message: str) -> None:
        self.marks.append(Mark(round(self.elapsed(), 3), name, message))


class FaultHook(Protocol):
    """A fault kind. ``apply`` runs at the event's time and may take as long as it needs."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None: ...


@dataclass(frozen=True)
class HookEntry:
    factory: Callable[[], FaultHook]
    params_model: type[BaseModel]
    needs_process: bool
    """True when the hook acts on the gateway's process, so the harness must have started it."""


_HOOKS: dict[str, HookEntry] = {}


def register_fault(
    name: str, params_model: type[BaseModel], *, needs_process: bool = False
) -> Callable[[type[Any]], type[Any]]:
    """Class decorator adding a hook to the registry; duplicate names are errors."""

    def add(cls: type[Any]) -> type[Any]:
        if name in _HOOKS:
            raise ValueError(f"fault hook {name!r} is already registered")
        _HOOKS[name] = HookEntry(cls, params_model, needs_process)
        return cls

    return add


def hook_names() -> list[str]:
    return sorted(_HOOKS)


def _entry(name: str) -> HookEntry:
    try:
        return _HOOKS[name]
    except KeyError:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(hook_names())}") from None


def validate_params(name: str, params: dict[str, Any]) -> BaseModel:
    """The hook's params model; KeyError for an unknown hook, ValidationError for bad params."""
    return _entry(name).params_model.model_validate(params)


def needs_process(name: str) -> bool:
    return _entry(name).needs_process


def create_hook(name: str) -> FaultHook:
    return _entry(name).factory()


async def run_faults(
    events: list[FaultEvent], ctx: FaultContext, sleep_until: Callable[[float], Any]
) -> None:
    """Run every event at its time (concurrently, so a long pause does not delay the next)."""

    async def one(event: FaultEvent) -> None:
        await sleep_until(event.at_s)
        try:
            await create_hook(event.name).apply(event, ctx)
        except (OSError, ValueError, RuntimeError) as exc:
            # A fault that cannot be applied (the gateway already died) is a finding, not a crash.
            ctx.mark(event.name, f"failed: {exc}")

    async with asyncio.TaskGroup() as group:
        for event in events:
            group.create_task(one(event))


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogParams(_Params):
    message: str = Field("", description="Text shown at this moment in the report and plots.")


@register_fault("log", LogParams)
class LogHook:
    """Marks a moment (a deploy, a config change made by hand) without touching anything."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None:
        assert isinstance(event.params, LogParams)
        ctx.mark(event.name, event.params.message or "mark")


class PauseParams(_Params):
    duration_s: float = Field(gt=0, le=600, description="How long the gateway stays stopped.")


@register_fault("pause", PauseParams, needs_process=True)
class PauseGateway:
    """SIGSTOPs the harness-started gateway, then SIGCONTs it: a frozen host or a long GC pause."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None:
        assert isinstance(event.params, PauseParams) and ctx.gateway_pid is not None
        os.kill(ctx.gateway_pid, signal.SIGSTOP)
        ctx.mark(event.name, f"gateway paused (SIGSTOP) for {event.params.duration_s:g} s")
        try:
            await asyncio.sleep(event.params.duration_s)
        finally:
            # Always resume, also when the run is cancelled, or the gateway would hang forever.
            os.kill(ctx.gateway_pid, signal.SIGCONT)
            ctx.mark(event.name, "gateway resumed (SIGCONT)")


register_fault("sigstop_gateway", PauseParams, needs_process=True)(PauseGateway)


class LinkParams(_Params):
    tier: str = Field(min_length=1, description="Tier whose emulated link changes.")
    duration_s: float = Field(
        gt=0, le=3600, description="How long the change lasts; then the previous values return."
    )
    partitioned: bool | None = Field(None, description="Cut the tier off (or heal it).")
    delay_ms: float | None = Field(None, ge=0, description="One-way delay, ms.")
    jitter_ms: float | None = Field(None, ge=0, description="Jitter per direction, ms.")
    loss: float | None = Field(None, ge=0, lt=1, description="Share of calls dropped.")
    loss_mode: Literal["timeout", "reset"] | None = Field(None, description="How drops fail.")
    bandwidth_mbps: float | None = Field(None, gt=0, description="Bandwidth cap, Mbit/s.")
    token_env: str = Field(
        ADMIN_TOKEN_ENV, description="Environment variable holding the gateway's admin token."
    )

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"tier", "duration_s", "token_env"})


class PartitionParams(_Params):
    tier: str = Field(min_length=1, description="Tier cut off from the gateway.")
    duration_s: float = Field(gt=0, le=3600, description="How long the partition lasts.")
    token_env: str = Field(
        ADMIN_TOKEN_ENV, description="Environment variable holding the gateway's admin token."
    )


@register_fault("link", LinkParams)
class ChangeLink:
    """Changes a tier's emulated link through the gateway's admin API (`PUT /admin/links/TIER`)
    for ``duration_s``, then puts the previous values back. The tier's link must be emulated
    (`tiers.TIER.link.emulate: true`) and the gateway started with ENSEMBLE_ADMIN_TOKEN set."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None:
        params = event.params
        assert isinstance(params, LinkParams | PartitionParams)
        changes = params.changes() if isinstance(params, LinkParams) else {"partitioned": True}
        if ctx.gateway_url is None:
            raise ValueError("the link fault needs the gateway's URL (target.url or config)")
        token = os.environ.get(params.token_env)
        if not token:
            raise ValueError(f"the link fault needs the admin token in ${params.token_env}")
        what = ", ".join(f"{k}={v}" for k, v in changes.items())
        async with httpx.AsyncClient(
            base_url=ctx.gateway_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=10.0,
            trust_env=False,
        ) as client:
            before = await _put_link(client, params.tier, changes)
            ctx.mark(event.name, f"link to {params.tier}: {what} for {params.duration_s:g} s")
            try:
                await asyncio.sleep(params.duration_s)
            finally:
                # Always restore, also when the run is cancelled, or the tier stays cut off.
                await asyncio.shield(_restore_link(client, params.tier, changes, before))
                ctx.mark(event.name, f"link to {params.tier} restored")


register_fault("partition", PartitionParams)(ChangeLink)


async def _put_link(
    client: httpx.AsyncClient, tier: str, changes: dict[str, Any]
) -> dict[str, Any]:
    """PUT the changes; the link's settings before them."""
    try:
        current = await client.get("/admin/links")
        current.raise_for_status()
        links = current.json()["links"]
        if tier not in links:
            raise ValueError(f"the gateway has no tier {tier!r}; it has {', '.join(links)}")
        answer = await client.put(f"/admin/links/{tier}", json=changes)
        answer.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise RuntimeError(
            f"admin API answered {exc.response.status_code}: {exc.response.text}"
        ) from None
    except httpx.HTTPError as exc:
        raise OSError(f"admin API unreachable: {exc}") from None
    before: dict[str, Any] = links[tier]
    return before


async def _restore_link(
    client: httpx.AsyncClient, tier: str, changes: dict[str, Any], before: dict[str, Any]
) -> None:
    """Put back what ``changes`` replaced: the config's settings when nothing was overridden."""
    if not before.get("overrides"):
        try:
            answer = await client.delete(f"/admin/links/{tier}")
        except httpx.HTTPError as exc:
            raise OSError(f"admin API unreachable: {exc}") from None
        if answer.status_code != 200:
            raise RuntimeError(f"admin API answered {answer.status_code}: {answer.text}")
        return
    await _put_link(client, tier, {key: before[key] for key in changes})


class KillReplicaParams(_Params):
    replica: str = Field(min_length=1, description="Name of a replica the harness started.")
    down_s: float = Field(
        3.0, ge=0, le=600, description="How long it stays dead before it is started again."
    )
    restart: bool = Field(True, description="Start it again on its ports after `down_s`.")


@register_fault("kill_replica", KillReplicaParams)
class KillReplica:
    """SIGKILLs a replica process the harness started (a crash: no drain, connections reset),
    then starts it again on the same ports after ``down_s`` and waits until it is ready."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None:
        params = event.params
        assert isinstance(params, KillReplicaParams)
        target = ctx.replica(params.replica)
        pid = target.kill()
        ctx.mark(event.name, f"replica {params.replica} killed (SIGKILL, pid {pid})")
        if not params.restart:
            return
        await asyncio.sleep(params.down_s)
        ctx.mark(event.name, f"replica {params.replica} restarting")
        try:
            await target.restart()
        finally:
            # A start the run's end cancels still completes (the replica must not stay half
            # started); say when it did.
            if target.running:
                ctx.mark(event.name, f"replica {params.replica} ready again")


class SlowReplicaParams(_Params):
    replica: str = Field(min_length=1, description="Name of a replica the harness started.")
    delay_ms: float = Field(gt=0, le=60_000, description="Added to every request to it, ms.")
    duration_s: float = Field(gt=0, le=3600, description="How long it stays slow.")


@register_fault("slow_replica", SlowReplicaParams)
class SlowReplica:
    """Makes a harness-started replica slow: every request to it waits ``delay_ms`` in the
    delay proxy in front of it (`loadtest/replicas.py`) for ``duration_s``, then none."""

    async def apply(self, event: FaultEvent, ctx: FaultContext) -> None:
        params = event.params
        assert isinstance(params, SlowReplicaParams)
        target = ctx.replica(params.replica)
        target.set_delay_ms(params.delay_ms)
        ctx.mark(
            event.name,
            f"replica {params.replica} slow (+{params.delay_ms:g} ms) for {params.duration_s:g} s",
        )
        try:
            await asyncio.sleep(params.duration_s)
        finally:
            # Always undo, also when the run is cancelled, or the replica stays slow.
            target.set_delay_ms(0.0)
            ctx.mark(event.name, f"replica {params.replica} fast again")
