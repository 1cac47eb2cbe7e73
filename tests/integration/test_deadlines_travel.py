"""Deadlines that travel, through real servers: the gateway's replica clients (oip-http and
oip-grpc) send each call's time left to a real `ensemble replica`, which stops work whose
deadline passed instead of running it for nobody; a gRPC call's own deadline is the
gateway's deadline when the request sets no `timeout`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from ensemble.clock import SYSTEM_CLOCK
from ensemble.errors import MemberFailed
from ensemble.replicas.oip_grpc import GrpcReplica
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.remote import RemoteReplica
from ensemble.scope import request_scope
from ensemble.types import TensorSpec
from tests.helpers import metric, scrape
from tests.integration.process import (
    ZOO,
    GatewayProcess,
    start_from_config,
    start_replica,
    zoo_member,
)

pytestmark = pytest.mark.integration
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))
CALLS, ROWS, LEFT_S = 40, 256, 0.02


@pytest.fixture(scope="module")
def replica(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("deadlines")
    # One thread, no batching: a burst of large calls queues, and most cannot finish in time.
    proc = start_replica(
        ZOO / "svm.onnx", tmp / "svm.log", "--executor-threads", "1", "--no-batching"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def client(kind: str, replica: GatewayProcess) -> RemoteReplica:
    if kind == "http":
        return HttpReplica("cloud/0", "cloud", replica.http_url, "svm", OUTPUTS)
    return GrpcReplica("cloud/0", "cloud", replica.grpc_target, "svm", OUTPUTS)


def burst(remote: RemoteReplica, left_s: float | None) -> list[str]:
    """CALLS calls at once, each in a request with ``left_s`` left (None: no deadline)."""
    feed = {"input": np.random.default_rng(0).random((ROWS, 64), dtype=np.float32)}

    async def one() -> str:
        scope = (
            contextlib.nullcontext()
            if left_s is None
            else request_scope(SYSTEM_CLOCK.now() + left_s, 0, SYSTEM_CLOCK)
        )
        with scope:
            try:
                await remote.infer(feed)
            except MemberFailed as exc:
                return exc.message
        return "ok"

    async def main() -> list[str]:
        await remote.start()
        try:
            return list(await asyncio.gather(*(one() for _ in range(CALLS))))
        finally:
            await remote.close()

    return asyncio.run(main())


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_the_replica_stops_work_whose_deadline_passed(kind: str, replica: GatewayProcess) -> None:
    def stopped_so_far() -> float:
        """Calls the replica cut off at their deadline, and requests it shed for it."""
        text = scrape(replica.http_url)
        cut = 'ensemble_member_calls_total{member="svm",outcome="timeout",tier="local"}'
        shed = 'ensemble_shed_requests_total{reason="deadline"}'
        return metric(text, cut, 0.0) + metric(text, shed, 0.0)

    before = stopped_so_far()
    late = burst(client(kind, replica), LEFT_S)
    given_up = [r for r in late if r != "ok"]
    assert len(given_up) >= CALLS // 2, late  # one thread cannot do 40 x 256 rows in 20 ms
    assert all("in time" in r or "DEADLINE_EXCEEDED" in r for r in given_up), given_up
    stopped = stopped_so_far() - before
    # The replica gave them up: without the deadline it would run all 40 (0 stopped). Its
    # deadline is the client's plus the call's transit, so a call it finishes inside that skew
    # is late for the client but done at the replica; on a loaded machine the skew holds a few.
    assert stopped >= 0.75 * len(given_up), (stopped, given_up)
    assert burst(client(kind, replica), None) == ["ok"] * CALLS  # no deadline: all done


def test_a_grpc_deadline_is_the_requests_deadline(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("grpc-deadline")
    doc = {"ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}]}
    gw = start_from_config(doc, tmp)
    try:
        with grpcclient.InferenceServerClient(gw.grpc_target) as triton:
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
            plain = triton.infer("digits", [tensor]).get_response()
            bounded = triton.infer("digits", [tensor], client_timeout=5.0).get_response()
        assert "deadline_met" not in plain.parameters
        assert bounded.parameters["deadline_met"].bool_param is True
    finally:
        assert gw.stop() == 0, gw.log()
