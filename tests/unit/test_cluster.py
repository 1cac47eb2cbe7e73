"""The workers' shared state machinery in one process: the hub's order of changes, snapshots for
a worker that joins, reloads all-or-none, the leader, the shared admission count, merged
metrics. Real Unix sockets and shared memory; the workers are links in this event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ensemble.cluster.hub import Hub
from ensemble.cluster.link import HubLink, RemoteError
from ensemble.cluster.slots import SharedSlots
from ensemble.cluster.wire import frame
from ensemble.dataplane.admission import AdmissionGate
from ensemble.dataplane.feedback import owner
from ensemble.metrics import GatewayMetrics
from ensemble.metrics.merge import exposition, merge
from policies.admission import Bounded, BoundedParams


class Node:
    """A worker's shared state: a list of the changes it applied, and whether it accepts the
    next config (``refuse``)."""

    def __init__(self, index: int) -> None:
        self.link = HubLink(index)
        self.applied: list[Any] = []
        self.refuse: list[str] = []
        self.config = "v0"
        self._pending: str | None = None
        self.link.on_change("add", self.applied.append)
        self.link.on_request("snapshot", lambda _: list(self.applied))
        self.link.on_request("echo", lambda value: (self.link.index, value))
        self.link.on_request("reload_prepare", self._prepare)
        self.link.on_request("reload_commit", self._commit)
        self.link.on_request("reload_abort", self._abort)

    async def _prepare(self, payload: tuple[str, str]) -> list[str]:
        self._pending = payload[0]
        return self.refuse

    async def _commit(self, _: object) -> str:
        assert self._pending is not None
        self.config, self._pending = self._pending, None
        return "ok"

    async def _abort(self, _: object) -> None:
        self._pending = None

    async def join(self, path: str) -> None:
        snapshot, *_ = await self.link.connect(path, 0)
        if snapshot is not None:
            self.applied[:0] = snapshot


async def settle(condition: Any, timeout_s: float = 5.0) -> None:
    """Let the links deliver until ``condition()`` holds (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (deliveries set no event to wait on)
            await asyncio.sleep(0.001)


def with_hub(tmp_path: Path, body: Callable[[Hub, str], Awaitable[None]]) -> None:
    """Run ``body(hub, socket path)`` on a hub serving a config "v0" (its file says "v-file")."""
    config = tmp_path / "gateway.yaml"
    config.write_text("v-file")

    async def main() -> None:
        hub = Hub("v0", str(config))
        path = str(tmp_path / "hub.sock")
        await hub.start(path)
        try:
            await asyncio.wait_for(body(hub, path), 30)
        finally:
            await hub.close()

    asyncio.run(main())


def test_every_worker_applies_every_change_in_one_order(tmp_path: Path) -> None:
    with_hub(tmp_path, _test_every_worker_applies_every_change_in_one_order)


async def _test_every_worker_applies_every_change_in_one_order(hub_: Hub, path: str) -> None:
    nodes = [Node(i) for i in range(3)]
    for node in nodes:
        await node.join(path)
    for i in range(30):  # three publishers interleaved
        nodes[i % 3].link.publish("add", i)
    await settle(lambda: all(len(n.applied) == 30 for n in nodes))
    assert nodes[0].applied == nodes[1].applied == nodes[2].applied
    assert sorted(nodes[0].applied) == list(range(30))
    for node in nodes:
        await node.link.close()


def test_a_late_worker_gets_a_snapshot_then_the_changes_after_it(tmp_path: Path) -> None:
    with_hub(tmp_path, _test_a_late_worker_gets_a_snapshot_then_the_changes_after_it)


async def _test_a_late_worker_gets_a_snapshot_then_the_changes_after_it(
    hub_: Hub, path: str
) -> None:
    first = Node(0)
    await first.join(path)
    for i in range(5):
        first.link.publish("add", i)
    await settle(lambda: len(first.applied) == 5)
    late = Node(1)
    joining = asyncio.create_task(late.join(path))
    for i in range(5, 10):  # published while it joins: in the snapshot or after it, never both
        first.link.publish("add", i)
    await joining
    await settle(lambda: len(first.applied) == 10 and len(late.applied) >= 10)
    assert late.applied == first.applied == list(range(10))
    for node in (first, late):
        await node.link.close()


def test_leader_is_the_lowest_live_worker_and_moves_when_it_leaves(tmp_path: Path) -> None:
    with_hub(tmp_path, _test_leader_is_the_lowest_live_worker_and_moves_when_it_leaves)


async def _test_leader_is_the_lowest_live_worker_and_moves_when_it_leaves(
    hub_: Hub, path: str
) -> None:
    nodes = [Node(i) for i in range(2)]
    for node in nodes:
        await node.join(path)
    await settle(lambda: nodes[1].link.leader == 0 and nodes[1].link.workers == 2)
    assert nodes[0].link.is_leader and not nodes[1].link.is_leader
    await nodes[0].link.close()
    await settle(lambda: nodes[1].link.leader == 1)
    assert nodes[1].link.is_leader and nodes[1].link.workers == 1
    await nodes[1].link.close()


def test_asking_one_worker_or_all(tmp_path: Path) -> None:
    with_hub(tmp_path, _test_asking_one_worker_or_all)


async def _test_asking_one_worker_or_all(hub_: Hub, path: str) -> None:
    nodes = [Node(i) for i in range(2)]
    for node in nodes:
        await node.join(path)
    assert await nodes[0].link.ask(1, "echo", "x") == (1, "x")
    everyone = await nodes[1].link.ask(None, "echo", "y")
    assert everyone == {0: (True, (0, "y")), 1: (True, (1, "y"))}
    with pytest.raises(RemoteError, match="worker 7 is not running"):
        await nodes[0].link.ask(7, "echo", "z")
    with pytest.raises(RemoteError, match="no handler"):
        await nodes[0].link.ask(1, "nothing", None)
    for node in nodes:
        await node.link.close()


def test_a_reload_applies_in_every_worker_or_in_none(tmp_path: Path) -> None:
    with_hub(tmp_path, _test_a_reload_applies_in_every_worker_or_in_none)


async def _test_a_reload_applies_in_every_worker_or_in_none(hub_: Hub, path: str) -> None:
    nodes = [Node(i) for i in range(2)]
    for node in nodes:
        await node.join(path)
    nodes[1].refuse = ["line 3: no such policy"]
    refused = await nodes[0].link.reload("v1")
    assert not refused.ok
    assert refused.workers == {0: "rolled back", 1: "line 3: no such policy"}
    assert refused.errors == ["worker 1: line 3: no such policy"]
    assert [n.config for n in nodes] == ["v0", "v0"] and hub_.config_text == "v0"
    nodes[1].refuse = []
    applied = await nodes[1].link.reload("v2")
    assert applied.ok and applied.workers == {0: "applied", 1: "applied"}
    assert [n.config for n in nodes] == ["v2", "v2"]
    assert (hub_.config_text, hub_.generation) == ("v2", 1)
    from_file = await hub_.reload(None)  # SIGHUP: the file's text, for every later restart too
    assert from_file.ok and [n.config for n in nodes] == ["v-file", "v-file"]
    assert hub_.config_text == "v-file"
    for node in nodes:
        await node.link.close()


def test_feedback_ids_name_the_worker_that_keeps_the_answer() -> None:
    assert owner("3.AbCdEf") == 3
    assert owner("AbCdEf") is None  # one process: no prefix
    assert owner("x.AbC") is None and owner("12345.AbC") is None


def test_admission_limit_is_one_for_all_workers() -> None:
    """Two gates on one shared count (as two workers have): together they run at most the
    policy's max_running; a slot one frees lets the other's waiter in (its poll)."""
    asyncio.run(_admission())


async def _admission() -> None:
    cells = multiprocessing.get_context("spawn").Array("q", 2)
    policy = Bounded(BoundedParams(max_running=3, max_waiting=4))
    gates = [AdmissionGate(GatewayMetrics(), slots=SharedSlots(cells, i)) for i in range(2)]
    release = asyncio.Event()
    running: list[int] = []

    async def request(gate: AdmissionGate) -> None:
        async with gate.slot(policy, 0, None):
            running.append(1)
            await release.wait()

    tasks = [asyncio.create_task(request(gates[i % 2])) for i in range(6)]
    await settle(lambda: len(running) == 3)
    await asyncio.sleep(0.01)  # more polls: still no fourth slot
    assert len(running) == 3 and gates[0].running == gates[1].running == 3
    assert gates[0].waiting + gates[1].waiting == 3
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len(running) == 6 and list(cells) == [0, 0]


def test_metrics_of_all_workers_add_up_and_shared_state_shows_once() -> None:
    workers = [GatewayMetrics(), GatewayMetrics()]
    for i, m in enumerate(workers):
        m.record_request("digits", "http", "success", 0.002)
        m.record_reload("success")  # every worker applies each reload
        m.readiness = lambda i=i: {"digits": i == 0}
    text = exposition(merge([list(m.collect()) for m in workers]))[0].decode()
    assert 'ensemble_requests_total{model="digits",outcome="success",protocol="http"} 2.0' in text
    assert 'ensemble_config_reloads_total{outcome="success"} 1.0' in text
    assert 'ensemble_model_ready{model="digits"} 0.0' in text  # not ready in every worker
    assert "ensemble_request_duration_seconds_count" in text
    assert 'ensemble_request_duration_seconds_count{model="digits",protocol="http"} 2.0' in text
    # Each worker's process is its own: shown per worker, never added up.
    assert 'process_start_time_seconds{worker="0"}' in text
    assert 'process_start_time_seconds{worker="1"}' in text
    [info] = [line for line in text.splitlines() if line.startswith("python_info{")]
    assert info.endswith(" 1.0")  # one interpreter, the same in each


def test_a_worker_that_leaves_before_it_is_welcomed_never_counts_as_live(tmp_path: Path) -> None:
    with_hub(tmp_path, _leaves_early)


async def _leaves_early(hub_: Hub, path: str) -> None:
    first = Node(0)
    await first.join(path)
    async with hub_._lock:  # a reload in progress: the next worker waits to join
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(("hello", 1, 0, 0)))
        await writer.drain()
        await settle(lambda: hub_.free_index() == 2)  # it said hello
        writer.close()  # it dies before the hub could welcome it
        await settle(lambda: hub_.free_index() == 1)  # and left
    await asyncio.sleep(0.05)
    assert hub_.live == [0] and hub_.leader == 0
    everyone = await first.link.ask(None, "echo", "still answers")
    assert everyone == {0: (True, (0, "still answers"))}
    await first.link.close()
