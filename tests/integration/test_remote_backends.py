"""A gateway whose ensemble mixes inprocess, oip-http and oip-grpc members served by real
`ensemble replica` processes: same answers as in-process, failover when a replica process
dies, and the dead one found again by health checks once it is back on its port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import wait_for
from tests.integration.conftest import array_input
from tests.integration.process import (
    ZOO,
    GatewayProcess,
    start_from_config,
    start_replica,
    zoo_member,
)

pytestmark = pytest.mark.integration
CHECK = {"health_check_interval_s": 0.2, "health_check_timeout_s": 1.0}
MODELS = {
    "forest_http": ZOO / "forest.onnx",
    "forest_grpc": ZOO / "forest.onnx",
    "mlp_small": ZOO / "mlp_small.onnx",
}


@dataclass
class Fleet:
    gateway: GatewayProcess
    replicas: dict[str, GatewayProcess]
    """forest_http (forest's edge replica, oip-http), forest_grpc (its cloud one, oip-grpc),
    mlp_small (its only replica, oip-grpc)."""
    tmp: Path

    def restart(self, key: str) -> None:
        """Start the replica ``key`` again on the ports it had."""
        old = self.replicas[key]
        self.replicas[key] = start_replica(
            MODELS[key],
            self.tmp / f"{key}-again.log",
            http_port=old.http_port,
            grpc_port=old.grpc_port,
        )


@pytest.fixture(scope="module")
def fleet(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("remote")
    replicas = {key: start_replica(model, tmp / f"{key}.log") for key, model in MODELS.items()}
    config = {
        "ensembles": [
            {
                "name": "mixed",
                "members": [
                    zoo_member("logreg"),
                    zoo_member(
                        "forest",
                        {
                            "tier": "edge",
                            "backend": "oip-http",
                            "endpoints": [replicas["forest_http"].http_url],
                            **CHECK,
                        },
                        {
                            "tier": "cloud",
                            "backend": "oip-grpc",
                            "endpoints": [replicas["forest_grpc"].grpc_target],
                            **CHECK,
                        },
                    ),
                    zoo_member(
                        "mlp_small",
                        {
                            "tier": "cloud",
                            "backend": "oip-grpc",
                            "endpoints": [replicas["mlp_small"].grpc_target],
                            **CHECK,
                        },
                    ),
                ],
            },
            {
                # The same models, every one in the gateway's process: the expected answers.
                "name": "local",
                "members": [
                    {**zoo_member("logreg"), "name": "logreg_local"},
                    {**zoo_member("forest"), "name": "forest_local"},
                    {**zoo_member("mlp_small"), "name": "mlp_small_local"},
                ],
            },
        ]
    }
    gateway = start_from_config(config, tmp)
    fleet = Fleet(gateway, replicas, tmp)
    yield fleet
    assert gateway.stop() == 0, gateway.log()
    assert "Traceback" not in gateway.log(), gateway.log()
    for proc in fleet.replicas.values():
        if proc.proc.poll() is None:
            assert proc.stop() == 0, proc.log()


def infer(client: httpx.Client, model: str, x: np.ndarray) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [array_input(x)]}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    return response.status_code, response.json()


def metrics(gw: GatewayProcess) -> dict[str, float]:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def replica_ready(gw: GatewayProcess, member: str, replica: str) -> float:
    tier = replica.split("/")[0]
    key = f'ensemble_replica_ready{{member="{member}",replica="{replica}",tier="{tier}"}}'
    return metrics(gw)[key]


def test_mixed_backends_answer_as_the_in_process_ensemble(
    fleet: Fleet, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    with httpx.Client(base_url=fleet.gateway.http_url, timeout=30) as client:
        tiers: set[str] = set()
        for i in range(0, 60, 20):
            status, mixed = infer(client, "mixed", x[i : i + 20])
            assert status == 200, mixed
            status, local = infer(client, "local", x[i : i + 20])
            assert status == 200, local
            assert mixed["outputs"][0]["data"] == local["outputs"][0]["data"]
            assert np.allclose(mixed["outputs"][1]["data"], local["outputs"][1]["data"], atol=1e-5)
            params = mixed["parameters"]
            assert params["completeness"] == 1.0
            answered = params["members_answered"].split(",")
            assert "logreg@edge" in answered and "mlp_small@cloud" in answered
            tiers |= {a for a in answered if a.startswith("forest@")}
        assert tiers == {"forest@edge", "forest@cloud"}  # round robin over oip-http and oip-grpc
        # A remote member addressed directly returns the model's own outputs.
        status, direct = infer(client, "mlp_small", x[:5])
        status_local, local = infer(client, "mlp_small_local", x[:5])
        assert status == status_local == 200
        assert direct["outputs"][0]["data"] == local["outputs"][0]["data"]
    accuracy = np.mean(np.asarray(mixed["outputs"][0]["data"]) == y[40:60])
    assert accuracy > 0.9

    grpc = grpcclient.InferenceServerClient(fleet.gateway.grpc_target)
    try:
        inp = grpcclient.InferInput("input", [5, 64], "FP32")
        inp.set_data_from_numpy(x[:5])
        labels = grpc.infer("mixed", [inp]).as_numpy("label")
        assert labels.tolist() == local["outputs"][0]["data"]
        assert grpc.is_model_ready("forest") and grpc.is_server_ready()
    finally:
        grpc.close()
    m = metrics(fleet.gateway)
    for member, replica in [("forest", "edge/0"), ("forest", "cloud/0"), ("mlp_small", "cloud/0")]:
        assert replica_ready(fleet.gateway, member, replica) == 1.0
    assert m['ensemble_member_calls_total{member="forest",outcome="success",tier="edge"}'] >= 1


class Traffic:
    """Sends requests one after another from a thread until stopped; keeps every outcome."""

    def __init__(self, gw: GatewayProcess, model: str, x: np.ndarray) -> None:
        self.results: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gw.http_url, model, x))
        self._thread.start()

    def _run(self, url: str, model: str, x: np.ndarray) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                self.results.append(infer(client, model, x))

    def stop(self) -> list[tuple[int, dict[str, Any]]]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.results


def test_a_dead_replica_fails_over_then_comes_back_by_itself(
    fleet: Fleet, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    gw = fleet.gateway
    x = test_split[0][:4]
    ensemble, direct = Traffic(gw, "mixed", x), Traffic(gw, "forest", x)
    try:
        wait_for(lambda: len(direct.results) >= 20, "traffic flows")
        fleet.replicas["forest_http"].kill()  # the edge replica's process dies mid-traffic
        wait_for(lambda: replica_ready(gw, "forest", "edge/0") == 0.0, "forest edge/0 is unready")
        during = len(direct.results)
        wait_for(lambda: len(direct.results) >= during + 20, "traffic flows without it")
        # The gateway stays ready: forest still has its cloud replica.
        assert httpx.get(f"{gw.http_url}/v2/health/ready", timeout=10).status_code == 200
        fleet.restart("forest_http")
        wait_for(lambda: replica_ready(gw, "forest", "edge/0") == 1.0, "forest edge/0 is back")
        back = len(direct.results)
        wait_for(lambda: len(direct.results) >= back + 20, "traffic flows to both again")
    finally:
        mixed_results, direct_results = ensemble.stop(), direct.stop()
    results = mixed_results + direct_results
    failed = [(status, doc) for status, doc in results if status != 200]
    assert not failed, failed[:3]  # every request answered, none lost
    answered = [doc["parameters"]["members_answered"] for _, doc in results]
    assert all("forest@" in a for a in answered)  # forest answered every request (failover)
    tail = [doc["parameters"]["members_answered"] for _, doc in direct_results[-10:]]
    assert "forest@edge" in tail  # routing uses the edge replica again
    m = metrics(gw)
    retries = sum(v for k, v in m.items() if k.startswith('ensemble_retries_total{member="forest"'))
    assert retries >= 1  # calls the dead replica failed were retried on the other tier


def test_a_member_whose_only_replica_dies_is_left_out_until_it_returns(
    fleet: Fleet, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    gw = fleet.gateway
    x = test_split[0][:4]
    fleet.replicas["mlp_small"].kill()
    wait_for(lambda: replica_ready(gw, "mlp_small", "cloud/0") == 0.0, "mlp_small is unready")
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "mixed", x)
        assert status == 200  # the ensemble answers from the members it has
        assert "mlp_small" not in doc["parameters"]["members_answered"]
        status, doc = infer(client, "mlp_small", x)
        assert status == 503 and "no ready replica" in doc["error"]  # a clear error, at once
        assert client.get("/v2/models/mlp_small/ready").status_code == 503
        assert client.get("/v2/health/ready").status_code == 503  # not every model is ready
    fleet.restart("mlp_small")  # gRPC reconnects by itself
    wait_for(lambda: replica_ready(gw, "mlp_small", "cloud/0") == 1.0, "mlp_small is back")
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        status, doc = infer(client, "mixed", x)
        assert status == 200 and doc["parameters"]["completeness"] == 1.0
        assert "mlp_small@cloud" in doc["parameters"]["members_answered"]
        assert client.get("/v2/health/ready").status_code == 200


def test_a_cancelled_http_call_closes_its_connection() -> None:
    """A hedge's loser or a call past its deadline is abandoned: the server sees the
    connection close, and the pool keeps nothing half-used."""
    import asyncio

    from ensemble.replicas.oip_http import HttpReplica
    from ensemble.types import TensorSpec

    async def main() -> None:
        closed = asyncio.Event()
        handlers: list[asyncio.Task[None]] = []

        async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/ready" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                await reader.read()  # until the client closes the connection
                if b"/infer" in head:
                    closed.set()  # the client gave up on its request
            finally:
                writer.close()
                await writer.wait_closed()

        server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        outputs = [TensorSpec("p", "FP32", (-1, 2))]
        replica = HttpReplica("edge/0", "edge", f"http://127.0.0.1:{port}", "m", outputs)
        await replica.start()
        assert replica.ready()
        call = asyncio.ensure_future(replica.infer({"x": np.zeros((1, 2), np.float32)}))
        await asyncio.sleep(0.1)
        call.cancel()
        await asyncio.wait_for(closed.wait(), 5)
        assert call.cancelled()
        pool = replica._client._transport._pool  # type: ignore[union-attr]
        assert pool.connections == []
        await replica.close()
        await asyncio.wait(handlers, timeout=5)  # the health checker's connection closes too
        server.close()
        await server.wait_closed()

    asyncio.run(main())
