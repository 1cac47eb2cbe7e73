"""The load-test tools' own replica processes (`loadtest/replicas.py`), real `ensemble replica`
servers: killed, started again, and never left running when a start is cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from loadtest.replicas import ReplicaProcess

pytestmark = pytest.mark.integration


def test_a_start_cancelled_half_way_leaves_no_process_behind(zoo_dir: Path, tmp_path: Path) -> None:
    replica = ReplicaProcess("forest_a", zoo_dir / "forest.onnx", tmp_path)

    async def go() -> tuple[int, int | None]:
        await replica.start()
        ports = replica.http_port, replica.grpc_port
        replica.kill()
        assert not replica.running
        # The run ends while the replica is starting again (as the load's end cancels a
        # kill_replica fault half way through its restart).
        restart = asyncio.ensure_future(replica.restart())
        await asyncio.sleep(0.2)
        restart.cancel()
        with pytest.raises(asyncio.CancelledError):
            await restart
        # The start went through anyway, on the same ports, and the process is held here.
        assert replica.running and replica.starts == 2
        assert (replica.http_port, replica.grpc_port) == ports
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{replica.direct_url}/v2/health/ready")
        return ready.status_code, await replica.stop()

    status, code = asyncio.run(go())
    assert status == 200
    assert code == 0  # SIGTERM: a clean exit
    assert not replica.running
