"""One worker of a gateway of several (``ensemble serve --workers N``): a whole gateway process
with its own event loop and data plane, joined to the others through the supervisor's hub.

What the workers share, its owner, and how stale a worker's copy can be:

=========================================  ==========================  ========================
state                                      owner                       a worker's copy
=========================================  ==========================  ========================
selection learning, rolling accuracy,      the hub's order of labels   one hub round trip
rollouts' evidence from labels             (every worker applies each  behind
                                           label, in that order)
answers awaiting feedback                  the worker that answered    exact (a label is sent
                                           (its index leads the id)    to that worker)
admission: requests running                shared memory, a cell per   exact (at most
                                           worker, summed              workers - 1 over)
emulated link settings                     the hub's order of changes  one hub round trip
rollout decisions (promote, roll back)     the hub's order of changes  one hub round trip
scaling decisions                          the leader (lowest live     one control-loop tick
                                           index) decides, all apply
config                                     the hub (all or none)       exact after a reload
counts, spend, latency histograms          each worker; `/metrics`     exact at the scrape
                                           adds them up
replica health, ejection, live estimates,  each worker, for the calls  its own calls
input drift, rollout evidence from calls   it makes and rows it serves
=========================================  ==========================  ========================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

from ensemble.cluster.link import HubLink, RemoteError
from ensemble.cluster.slots import SharedSlots
from ensemble.config import parse_yaml
from ensemble.control.provisioning import Key
from ensemble.control.reload import ReloadResult
from ensemble.dataplane.feedback import owner, parse_body
from ensemble.errors import EnsembleError, WorkerUnavailable
from ensemble.metrics.merge import exposition, merge
from ensemble.replicas.links import Link
from ensemble.server import Addresses, Gateway, run_gateway
from policies.base import PlacementLoad

log = logging.getLogger("ensemble.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor starts a worker with."""

    index: int
    hub_path: str
    config_text: str
    config_source: str
    generation: int
    host: str
    http_port: int
    grpc_port: int
    log_level: int = logging.INFO


class Worker:
    """Joins a gateway to its hub: answers the others' questions, applies shared changes."""

    def __init__(self, gateway: Gateway, link: HubLink) -> None:
        self.gateway = gateway
        self.link = link
        self._scaling: set[asyncio.Task[None]] = set()
        gateway.dispatcher.feedback.learn = lambda labelled: link.publish("learn", labelled)
        gateway.dispatcher.share_decision = lambda decision: link.publish("rollout", decision)
        gateway.shared = _ClusterRoutes(self)
        gateway.reloads = _ClusterReloads(link)
        if gateway.control is not None:
            gateway.control.peers = _Peers(link)
        link.on_change("learn", gateway.dispatcher.feedback.apply)
        link.on_change("link", self._change_link)
        link.on_change("rollout", lambda d: gateway.dispatcher.repository.apply_decision(d))
        link.on_change("scale", self._scale)
        link.on_request("snapshot", lambda _: self.snapshot())
        link.on_request("metrics", lambda _: list(gateway.metrics.collect()))
        link.on_request("feedback", self._feedback)
        link.on_request("loads", self._loads)
        reloader = gateway.reloader
        assert reloader is not None
        link.on_request("reload_prepare", lambda p: reloader.prepare(*p))
        link.on_request("reload_commit", lambda _: reloader.commit())
        link.on_request("reload_abort", lambda _: reloader.abort())

    async def join(self, welcome: Awaitable[tuple[Any, int, str, str]], generation: int) -> None:
        """Wait for the hub's welcome (``generation``: of the config this worker was built
        on): catch up on a reload committed meanwhile, take the shared state's snapshot."""
        snapshot, current, text, where = await welcome
        self.gateway.dispatcher.feedback.store.prefix = f"{self.link.index}."
        if current != generation:
            reloader = self.gateway.reloader
            assert reloader is not None
            problems = await reloader.prepare(text, where)
            if problems:
                raise EnsembleError(f"cannot apply the gateway's current config: {problems}")
            await reloader.commit()
        if snapshot is not None:
            self.restore(snapshot)

    def snapshot(self) -> dict[str, Any]:
        """The shared state as this worker holds it now, for a worker that joins."""
        repository = self.gateway.dispatcher.repository
        feedback = self.gateway.dispatcher.feedback
        learning = {
            (e.name, p.name): p.learning.get()
            for e in repository.ensembles.values()
            for p in e.profiles.values()
        }
        links = {ln.tier: dict(ln.overrides) for ln in self.gateway.links or () if ln.overrides}
        decisions = [d for v in repository.versions.values() for d in v.decisions]
        return {
            "learning": learning,
            "accuracy": dict(feedback.accuracy),
            "links": links,
            "rollouts": decisions,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        repository = self.gateway.dispatcher.repository
        feedback = self.gateway.dispatcher.feedback
        for (ensemble, profile_name), state in snapshot["learning"].items():
            model = repository.ensembles.get(ensemble)
            profile = model.profiles.get(profile_name) if model is not None else None
            if profile is not None:
                profile.learning.update(_constant(state))
        feedback.accuracy.update(snapshot["accuracy"])
        for (ensemble, member), window in snapshot["accuracy"].items():
            if window.value is not None:
                feedback.metrics.rolling_accuracy[(ensemble, member)] = window.value
                served = repository.ensembles.get(ensemble)
                if served is not None and member in served.members:
                    served.members[member].rolling_accuracy = window.value
        for tier, overrides in snapshot["links"].items():
            self._change_link((tier, overrides))
        for decision in snapshot["rollouts"]:
            repository.apply_decision(decision)

    def _change_link(self, change: tuple[str, dict[str, Any] | None]) -> None:
        tier, changes = change
        link = self.gateway.links.get(tier) if self.gateway.links is not None else None
        if link is None:
            return
        link.change(changes)

    def _scale(self, targets: dict[Key, int]) -> None:
        control = self.gateway.control
        if control is None:
            return
        task = asyncio.create_task(control.apply(targets))
        self._scaling.add(task)
        task.add_done_callback(self._scaling.discard)

    def _loads(self, _: object) -> tuple[PlacementLoad, ...]:
        control = self.gateway.control
        return control.observe() if control is not None else ()

    def _feedback(self, request: tuple[str, bytes]) -> tuple[bool, Any]:
        """A label another worker took for an answer this one gave: (True, result) or
        (False, the error) for the taker to answer with."""
        try:
            return True, self.gateway.dispatcher.feedback.submit(*request)
        except EnsembleError as exc:
            return False, exc


class _ClusterRoutes:
    """`/metrics`, feedback and links for all workers together."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._link = worker.link

    async def exposition(self) -> tuple[bytes, str]:
        try:
            answers = await self._link.ask(None, "metrics", None)
        except RemoteError as exc:
            raise WorkerUnavailable(f"cannot collect the workers' metrics: {exc}") from None
        missing = sorted(index for index, (ok, _) in answers.items() if not ok)
        if missing:  # a partial sum would look like counters going back: fail the scrape
            raise WorkerUnavailable(f"worker(s) {missing} did not report their metrics")
        indexes = sorted(answers)
        return exposition(merge([answers[i][1] for i in indexes], indexes))

    async def feedback(self, name: str, body: bytes) -> dict[str, Any]:
        feedback = self._worker.gateway.dispatcher.feedback
        keeper = None
        with contextlib.suppress(EnsembleError):  # a bad body: submit counts and reports it
            keeper = owner(parse_body(body)[0])
        if keeper is None or keeper == self._link.index:
            return feedback.submit(name, body)
        try:
            ok, value = await self._link.ask(keeper, "feedback", (name, body))
        except RemoteError:
            return feedback.submit(name, body)  # that worker is gone: its answers with it (404)
        if not ok:
            raise value
        assert isinstance(value, dict)
        return value

    def change_link(self, link: Link, changes: dict[str, Any] | None) -> Link:
        trial = link.copy()  # validated on a copy: the change itself comes back in order
        trial.change(changes)
        self._link.publish("link", (link.tier, changes))
        return trial


def _constant(state: Any) -> Callable[[Any], Any]:
    return lambda _: state


class _ClusterReloads:
    """A reload applies in every worker or in none (the hub runs it)."""

    def __init__(self, link: HubLink) -> None:
        self._link = link

    async def reload_text(self, text: str) -> ReloadResult:
        return await self._reload(text)

    async def reload_file(self) -> ReloadResult:
        return await self._reload(None)

    async def _reload(self, text: str | None) -> ReloadResult:
        try:
            result = await self._link.reload(text)
        except RemoteError as exc:
            return ReloadResult(False, f"reload failed: {exc}", [str(exc)])
        return ReloadResult(result.ok, result.message, result.errors, result.workers)


class _Peers:
    """The control loop's view of the other workers."""

    def __init__(self, link: HubLink) -> None:
        self._link = link

    @property
    def leads(self) -> bool:
        return self._link.is_leader

    @property
    def workers(self) -> int:
        return self._link.workers

    async def loads(self) -> list[tuple[PlacementLoad, ...]]:
        answers = await self._link.ask(None, "loads", None)
        return [value for index, (ok, value) in answers.items() if ok and index != self._link.index]

    def publish(self, targets: dict[Key, int]) -> None:
        self._link.publish("scale", targets)


def worker_main(
    spec: WorkerSpec, http_socket: socket.socket, cells: SynchronizedArray[Any]
) -> None:
    """A worker process's entry point (the supervisor starts it with multiprocessing's spawn)."""
    logging.basicConfig(
        level=spec.log_level,
        format=f"ensemble: worker {spec.index} %(levelname)s %(name)s: %(message)s",
    )
    if spec.log_level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # as the command does
    import uvloop

    sys.exit(uvloop.run(_serve(spec, http_socket, cells)))


async def _serve(
    spec: WorkerSpec, http_socket: socket.socket, cells: SynchronizedArray[Any]
) -> int:
    source = Path(spec.config_source)
    cfg = parse_yaml(spec.config_text, source=str(source), base_dir=source.parent)
    link = HubLink(spec.index)

    def make() -> Gateway:
        return Gateway.from_config(cfg, slots=SharedSlots(cells, spec.index))

    async def join(gateway: Gateway) -> asyncio.Event:
        worker = Worker(gateway, link)
        await worker.join(link.connect(spec.hub_path, spec.generation), spec.generation)
        return link.closed

    def announce(addresses: Addresses) -> None:
        link.ready(addresses)

    try:
        return await run_gateway(
            make,
            spec.host,
            spec.http_port,
            spec.grpc_port,
            announce,
            join=join,
            http_socket=http_socket,
        )
    finally:
        await link.close()
        log.info("worker %d (pid %d) stopped", spec.index, os.getpid())
