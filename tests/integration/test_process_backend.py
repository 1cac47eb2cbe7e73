"""Process replicas: a gateway whose member is placed on `backend: process` starts `ensemble
replica` children on loopback, answers through them over HTTP and gRPC (tritonclient), grows and
shrinks them under the control loop without losing a request, keeps the added ones across a
reload, replaces a child that dies (with a backoff when it keeps dying), and leaves no child
behind: not after SIGTERM, not after SIGKILL, not when a child cannot start."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from ensemble.errors import EnsembleError
from ensemble.replicas.process import ProcessReplica, ReplicaCommand, cli_command
from ensemble.replicas.remote import HealthCheck
from tests.helpers import wait_for
from tests.integration.conftest import array_input
from tests.integration.process import (
    ROOT,
    ZOO,
    GatewayProcess,
    Traffic,
    start_from_config,
    zoo_member,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
X = np.random.default_rng(11).uniform(0, 16, (5, 64)).astype(np.float32)
CURRENT = 'ensemble_autoscaler_replicas{kind="current",member="logreg",tier="edge"}'


def own_copy(tmp: Path, name: str = "logreg") -> Path:
    """The zoo model (and its card) copied into ``tmp``: its path marks this test's children."""
    for suffix in (".onnx", ".card.json"):
        shutil.copy(ZOO / f"{name}{suffix}", tmp / f"{name}{suffix}")
    return tmp / f"{name}.onnx"


def process_member(model: Path, **placement: Any) -> dict[str, Any]:
    place = {"tier": "edge", "backend": "process", "health_check_interval_s": 0.2, **placement}
    return {"name": model.stem, "model": str(model), "placement": [place]}


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def session(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


def children(model: Path) -> dict[int, int]:
    """Live `ensemble replica` processes serving ``model``: pid -> parent pid (zombies are
    dead, so they are left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"replica" in cmdline and str(model).encode() in cmdline:
            stat = _stat(entry.name)
            if stat is not None and stat[0] != "Z":
                found[int(entry.name)] = stat[1]
    return found


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    out = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_process_replicas_answer_and_stop_with_the_gateway(tmp_path: Path) -> None:
    model = own_copy(tmp_path)
    config: dict[str, object] = {
        "ensembles": [
            {"name": "e", "members": [process_member(model, replicas={"min": 2, "max": 2})]},
            {"name": "local", "members": [{**zoo_member("logreg"), "name": "logreg_local"}]},
        ]
    }
    gw = start_from_config(config, tmp_path)
    try:
        kids = children(model)
        assert len(kids) == 2 and set(kids.values()) == {gw.proc.pid}, (kids, gw.log())
        # Each leads a session of its own: a terminal's Ctrl-C reaches only the gateway,
        # which stops its children in order.
        assert all(session(pid) == pid for pid in kids)
        local = httpx.post(
            f"{gw.http_url}/v2/models/local/infer", json={"inputs": [array_input(X)]}, timeout=30
        )
        expected = probabilities(local.json())
        with httpclient.InferenceServerClient(gw.http_target) as client:
            tensor = httpclient.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=True)
            for name in ("e", "logreg"):
                result = client.infer(name, [tensor])
                np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
            assert client.is_model_ready("logreg")
        with grpcclient.InferenceServerClient(gw.grpc_target) as grpc_client:
            tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            result = grpc_client.infer("e", [tensor])
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
            parameters = result.get_response().parameters
            assert parameters["members_answered"].string_param == "logreg@edge"
        ready = [
            line
            for line in httpx.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines()
            if line.startswith("ensemble_replica_ready{") and 'member="logreg"' in line
        ]
        assert len(ready) == 2 and all(line.endswith(" 1.0") for line in ready), ready
    finally:
        code = gw.stop()
    assert code == 0, gw.log()
    # Reaped by the gateway before it exited: a zombie it left would stay in /proc here.
    assert not any(Path(f"/proc/{pid}").exists() for pid in kids), gw.log()
    assert not children(model)
    log = gw.log()
    assert "Traceback" not in log and log.count("stopped (exit code 0)") == 2, log


def ready_replicas(gw: GatewayProcess, member: str = "logreg") -> list[float]:
    """``ensemble_replica_ready`` of each of the member's replicas now."""
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ensemble_replica_ready{") and f'member="{member}"' in line
    ]


def endpoint_of(gw: GatewayProcess, pid: int) -> str:
    """Where the child ``pid`` listens, from the gateway's log."""
    found = re.search(rf"process pid {pid} at (http://\S+), model \S+\) is listening", gw.log())
    assert found, gw.log()
    return found.group(1)


def test_a_killed_child_is_replaced_and_requests_keep_answering(tmp_path: Path) -> None:
    model = own_copy(tmp_path)
    config: dict[str, object] = {
        "ensembles": [
            {"name": "e", "members": [process_member(model, replicas={"min": 2, "max": 2})]}
        ]
    }
    gw = start_from_config(config, tmp_path)
    body = {"inputs": [array_input(X)]}
    try:
        kids = children(model)
        assert len(kids) == 2, gw.log()
        with Traffic(gw.http_url, "e", body, clients=2) as traffic:
            wait_for(lambda: len(traffic.statuses) >= 10, "traffic through both children")
            crashed, survivor = sorted(kids)
            os.kill(crashed, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{crashed}").exists(), "the gateway to reap it")
            wait_for(lambda: "exited on its own with code -9" in gw.log(), "the crash logged")
            wait_for(
                lambda: len(children(model)) == 2 and crashed not in children(model),
                "a new child in its place",
                60,
            )
            (fresh,) = set(children(model)) - {survivor}
            assert children(model)[fresh] == gw.proc.pid
            assert session(fresh) == fresh  # started like the first ones
            wait_for(lambda: ready_replicas(gw) == [1.0, 1.0], "both replicas ready again", 60)
            # The new child serves, on the port it reported (a free one: the kernel may hand
            # out the dead child's again).
            endpoint = endpoint_of(gw, fresh)
            direct = httpx.post(f"{endpoint}/v2/models/logreg/infer", json=body, timeout=30)
            assert direct.status_code == 200, direct.text
            # The other original goes too: now only the new child can answer.
            os.kill(survivor, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{survivor}").exists(), "the second one reaped")
            served = len(traffic.statuses)
            wait_for(lambda: len(traffic.statuses) >= served + 10, "answers from the new child")
            wait_for(lambda: len(children(model)) == 2, "the second one replaced", 60)
            wait_for(lambda: ready_replicas(gw) == [1.0, 1.0], "both ready again", 60)
        metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
        restarts = re.findall(r'ensemble_replica_restarts_total\{[^}]*tier="edge"\} (\S+)', metrics)
        assert sorted(restarts) == ["1.0", "1.0"], metrics  # each replica restarted its child once
        statuses = traffic.statuses
    finally:
        code = gw.stop()
    assert code == 0, gw.log()
    # Every request answered: calls on a dying child were retried on the other one.
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert not children(model)
    log = gw.log()
    assert log.count("exited on its own with code -9") == 2, log
    assert "restarted (restart 1 of this replica)" in log, log
    # The kills and the replacements: two children stopped cleanly with the gateway.
    assert "Traceback" not in log and log.count("stopped (exit code 0)") == 2, log


def test_a_child_that_keeps_crashing_is_restarted_with_backoff(tmp_path: Path) -> None:
    model = own_copy(tmp_path)
    good = model.read_bytes()
    replica = ProcessReplica(
        "edge/0",
        "edge",
        ReplicaCommand(model, "logreg"),
        (),
        health=HealthCheck(interval_s=0.2),
        restart_backoff_min_s=0.25,
        restart_backoff_max_s=1.0,
    )
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    async def until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not check():  # noqa: ASYNC110 (polling the replica's own state)
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for: {what}\n{messages}") from None

    async def main() -> None:
        await replica.start()
        try:
            assert replica.ready() and replica.pid is not None
            first = replica.pid
            model.write_bytes(b"not an onnx model")  # every new child now dies at start
            os.kill(first, signal.SIGKILL)
            await until(lambda: not replica.ready(), "unready")
            failed = lambda: sum("restart failed" in m for m in messages)  # noqa: E731
            await until(lambda: failed() >= 4, "four failed restarts")
            assert not replica.ready() and replica.restarts == 0
            model.write_bytes(good)  # the fault is fixed: the next attempt serves again
            await until(replica.ready, "ready after the fault is fixed")
            assert replica.pid not in (None, first) and replica.restarts == 1
            answer = await replica.infer({"input": X}, ["probabilities"])
            assert answer["probabilities"].shape == (5, 10)
        finally:
            await replica.close()

    handler = Keep()
    logger = logging.getLogger("ensemble.replicas")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    # At once after the crash, then 0.25, 0.5, 1, 1 s between attempts: never a hot loop.
    waits = [float(m.rsplit(" in ", 1)[1][:-2]) for m in messages if "restarting its" in m]
    assert waits[:4] == [0.25, 0.5, 1.0, 1.0], messages
    assert any("exited on its own with code -9" in m for m in messages), messages
    # The broken file no longer matches the card beside it: each new child refuses it.
    assert any("refused its model file before it was ready" in m for m in messages), messages
    assert replica.pid is not None and not Path(f"/proc/{replica.pid}").exists()
    assert not children(model)


def test_children_die_with_a_killed_gateway(tmp_path: Path) -> None:
    model = own_copy(tmp_path)
    config: dict[str, object] = {"ensembles": [{"name": "e", "members": [process_member(model)]}]}
    gw = start_from_config(config, tmp_path)
    kids = children(model)
    assert len(kids) == 1, gw.log()
    gw.kill()  # SIGKILL: no drain, no clean-up code runs in the gateway
    wait_for(lambda: not children(model), "the kernel to kill the orphaned child", 5)


def growing(model: Path, downscale_delay_s: float, **changes: Any) -> dict[str, Any]:
    """A gateway whose process placement (1-3 replicas) `target_inflight` scales at one call in
    flight per replica. Each call waits 100 ms in the gateway (an emulated straggler), so the
    clients' calls are in flight on the placement: 6 clients want 6 replicas."""
    place = {"replicas": {"min": 1, "max": 3}, "straggler": {"probability": 1, "delay_ms": 100}}
    return {
        "ensembles": [{"name": "e", "members": [process_member(model, **{**place, **changes})]}],
        "autoscaling": {
            "interval_s": 0.5,
            "window_s": 2,
            "policy": {
                "name": "target_inflight",
                "params": {
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": downscale_delay_s,
                },
            },
        },
    }


def test_placement_grows_under_load_and_drains_back_to_one(tmp_path: Path) -> None:
    model = own_copy(tmp_path)
    # 6 clients want 6 replicas, the bounds allow 3; 1 s after they stop, back to 1.
    config = growing(model, downscale_delay_s=1)
    gw = start_from_config(config, tmp_path)
    body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
    statuses: list[int] = []
    busy = threading.Event()
    busy.set()
    stop = threading.Event()

    def client(always: bool) -> None:
        with httpx.Client(base_url=gw.http_url, timeout=30) as http:
            while not stop.is_set():
                if always or busy.is_set():
                    statuses.append(http.post("/v2/models/e/infer", json=body).status_code)
                else:
                    time.sleep(0.05)

    # One client keeps calling while the placement shrinks: draining must not lose its calls.
    threads = [threading.Thread(target=client, args=(k == 0,)) for k in range(6)]
    try:
        (first,) = children(model)
        for thread in threads:
            thread.start()
        wait_for(lambda: current(gw) == 3.0, "the placement to grow to 3 replicas")
        wait_for(lambda: len(children(model)) == 3, "3 child processes")
        grown = children(model)
        time.sleep(1)  # calls flow through the new children for a while
        busy.clear()
        wait_for(lambda: current(gw) == 1.0, "the placement to shrink back to 1 replica")
        retired = set(grown) - {first}
        # Drained, stopped and reaped while the gateway runs (no zombie left in /proc).
        wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in retired),
            "the retired children to exit",
        )
        assert set(children(model)) == {first}
        time.sleep(0.5)  # the remaining client's calls go on through the one left
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        code = gw.stop()
    assert code == 0, gw.log()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    log = gw.log()
    assert re.search(r"logreg@edge \d -> 3 replicas", log), log
    assert "logreg@edge 3 -> 1 replicas" in log, log
    assert log.count("stopped (exit code 0)") == 3 and "Traceback" not in log, log


def test_a_reload_keeps_the_children_the_autoscaler_added(tmp_path: Path) -> None:
    token = "process-reload-token"
    model = own_copy(tmp_path)

    def doc(**changes: Any) -> dict[str, Any]:
        # 6 clients want 3 replicas (the max); with a 60 s downscale delay they stay.
        return {"server": {"drain_timeout_s": 1}, **growing(model, 60, **changes)}

    def reload(config: dict[str, Any]) -> None:
        done = httpx.put(
            f"{gw.http_url}/admin/config",
            content=yaml.safe_dump({"model_zoo": {"dir": str(ZOO)}, **config}),
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
        )
        assert done.status_code == 200, done.text

    gw = start_from_config(doc(), tmp_path, env={"ENSEMBLE_ADMIN_TOKEN": token})
    body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
    try:
        with Traffic(gw.http_url, "e", body, clients=6) as traffic:
            wait_for(lambda: current(gw) == 3.0, "the placement to grow to 3 replicas", 60)
            grown = set(children(model))
            assert len(grown) == 3, gw.log()
            # The same config again: the new config's placement starts with its 3 replicas
            # (new children, ready before the swap), not with its minimum of 1.
            reload(doc())
            assert ready_replicas(gw) == [1.0, 1.0, 1.0], gw.log()
            assert "reload keeps logreg@edge at 3 replicas (it had 3)" in gw.log()
            # The replaced children drain and exit; three new ones serve.
            wait_for(lambda: not set(children(model)) & grown, "the replaced children to exit")
            assert len(children(model)) == 3
            # A lower maximum: what it had, clamped.
            reload(doc(replicas={"min": 1, "max": 2}))
            assert ready_replicas(gw) == [1.0, 1.0], gw.log()
            served = len(traffic.statuses)
            wait_for(lambda: len(traffic.statuses) >= served + 10, "answers after the reloads")
        statuses = traffic.statuses
        # The loop's 2 s window (kept per placement across reloads) must forget the clients'
        # calls in flight first, or it grows the new placement again right after the reload.
        time.sleep(2.5)
        # A placement whose definition changed (here its call timeout) starts at its minimum.
        reload(doc(replicas={"min": 1, "max": 2}, timeout_s=7))
        assert ready_replicas(gw) == [1.0], gw.log()
        wait_for(lambda: len(children(model)) == 1, "one child after the last reload")
    finally:
        code = gw.stop()
    assert code == 0, gw.log()
    # Capacity was there throughout: every request during the reloads answered.
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert not children(model)
    assert "Traceback" not in gw.log()


def current(gw: GatewayProcess) -> float | None:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    line = next((line for line in text.splitlines() if line.startswith(CURRENT)), None)
    return float(line.rsplit(" ", 1)[1]) if line else None


def test_a_child_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    replica = ProcessReplica("edge/0", "edge", ReplicaCommand(corrupt, "corrupt"), ())

    async def start() -> None:
        try:
            await replica.start()
        finally:
            await replica.close()

    began = time.monotonic()
    with pytest.raises(EnsembleError) as info:
        asyncio.run(start())
    message = str(info.value)
    assert "exited with code 1 before it was ready" in message, message
    assert "its stderr ends with" in message and "cannot serve" in message, message
    assert time.monotonic() - began < 30
    assert replica.pid is not None and not Path(f"/proc/{replica.pid}").exists()


def test_a_gateway_whose_child_is_not_ready_in_time_exits_with_the_reason(
    tmp_path: Path,
) -> None:
    model = own_copy(tmp_path)
    slow = process_member(model, replicas={"min": 2, "max": 2})
    slow["placement"][0]["process"] = {"startup_timeout_s": 0.2}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"ensembles": [{"name": "e", "members": [slow]}]}))
    args = ["serve", str(path), "--http-port", "0", "--grpc-port", "0"]
    done = subprocess.run(
        cli_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "printed no ready line within 0.2 s (process.startup_timeout_s)" in done.stderr
    assert "ready:" not in done.stdout
    assert not children(model)


def test_a_reload_replaces_children_and_a_failed_one_leaves_none(tmp_path: Path) -> None:
    token = "process-reload-token"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old, new = own_copy(tmp_path / "a"), own_copy(tmp_path / "b")

    def doc(model: Path, **process: float) -> dict[str, Any]:
        member = process_member(model)
        if process:
            member["placement"][0]["process"] = process
        return {
            "model_zoo": {"dir": str(ZOO)},
            "server": {"drain_timeout_s": 1},  # replaced replicas close 1 s after a reload
            "ensembles": [{"name": "e", "members": [member]}],
        }

    def reload(config: dict[str, Any]) -> httpx.Response:
        return httpx.put(
            f"{gw.http_url}/admin/config",
            content=yaml.safe_dump(config),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    def answers() -> int:
        body = {"inputs": [array_input(X)]}
        return httpx.post(f"{gw.http_url}/v2/models/e/infer", json=body, timeout=30).status_code

    gw = start_from_config(doc(old), tmp_path, env={"ENSEMBLE_ADMIN_TOKEN": token})
    try:
        (first,) = children(old)
        failed = reload(doc(new, startup_timeout_s=0.2))
        assert failed.status_code == 400, failed.text
        assert "printed no ready line within 0.2 s" in failed.text
        assert not children(new) and set(children(old)) == {first}
        assert answers() == 200

        done = reload(doc(new))
        assert done.status_code == 200, done.text
        assert len(children(new)) == 1 and answers() == 200
        wait_for(lambda: not Path(f"/proc/{first}").exists(), "the replaced child to exit")
        assert answers() == 200
    finally:
        code = gw.stop()
    assert code == 0, gw.log()
    assert not children(new), gw.log()
