"""The well-behaved clients of the abuse harness: what others see while an attack runs."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

PERIOD_S = 0.02
"""Each established client sends a request this often."""
NEW_CLIENT_PERIOD_S = 0.25
"""A client on a new connection starts this often."""
TIMEOUT_S = 5.0


@dataclass
class Samples:
    """(seconds since the probe started, latency in seconds or None when it failed) by kind:
    `http` (inference, established connection), `health` (readiness, established), `grpc`
    (inference, established channel), `new_client` (readiness on a new connection)."""

    series: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, kind: str, at: float, latency: float | None, error: str = "") -> None:
        self.series.setdefault(kind, []).append((at, latency))
        if error:
            counts = self.errors.setdefault(kind, {})
            counts[error] = counts.get(error, 0) + 1


def _infer_body() -> bytes:
    row = ",".join("0" for _ in range(64))
    doc = f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,64],"data":[{row}]}}]}}'
    return doc.encode()


async def _loop(
    kind: str, samples: Samples, t0: float, stop: asyncio.Event, call: Any, period_s: float
) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await asyncio.wait_for(call(), TIMEOUT_S)
            samples.add(kind, started - t0, time.perf_counter() - started)
        except Exception as exc:  # what the client saw is the measurement
            samples.add(kind, started - t0, None, type(exc).__name__)
        await asyncio.sleep(max(0.0, period_s - (time.perf_counter() - started)))


async def _probe(http_url: str, grpc_target: str, conn: Connection) -> Samples:
    samples = Samples()
    stop = asyncio.Event()
    body = _infer_body()
    raw = np.zeros((1, 64), np.float32).tobytes()
    request = service_pb2.ModelInferRequest(
        model_name="digits",
        inputs=[{"name": "input", "datatype": "FP32", "shape": [1, 64]}],
        raw_input_contents=[raw],
    )
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=None)
    async with (
        httpx.AsyncClient(base_url=http_url, limits=limits, timeout=TIMEOUT_S) as client,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def http_infer() -> None:
            r = await client.post("/v2/models/digits/infer", content=body)
            if r.status_code != 200:
                raise RuntimeError(f"http_{r.status_code}")

        async def health() -> None:
            r = await client.get("/v2/health/ready")
            if r.status_code != 200:
                raise RuntimeError(f"http_{r.status_code}")

        async def grpc_infer() -> None:
            await stub.ModelInfer(request, timeout=TIMEOUT_S)

        host, _, port = http_url.removeprefix("http://").rpartition(":")

        async def new_client() -> None:  # a new connection: connect, ask, read the status line
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: probe\r\n\r\n")
                status = await reader.readline()
                if not status.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(status.decode(errors="replace").strip() or "closed")
            finally:
                writer.close()

        for call in (http_infer, health, grpc_infer):  # connections open before any attack
            await call()
        t0 = time.perf_counter()
        conn.send(("ready", time.time()))
        tasks = [
            asyncio.create_task(_loop("http", samples, t0, stop, http_infer, PERIOD_S)),
            asyncio.create_task(_loop("health", samples, t0, stop, health, PERIOD_S * 5)),
            asyncio.create_task(_loop("grpc", samples, t0, stop, grpc_infer, PERIOD_S)),
            asyncio.create_task(
                _loop("new_client", samples, t0, stop, new_client, NEW_CLIENT_PERIOD_S)
            ),
        ]
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_reader(conn.fileno(), done.set)  # the parent says "stop"
        await done.wait()
        loop.remove_reader(conn.fileno())
        stop.set()
        await asyncio.gather(*tasks)
    return samples


def _main(http_url: str, grpc_target: str, conn: Connection) -> None:
    samples = asyncio.run(_probe(http_url, grpc_target, conn))
    conn.send(("samples", samples))


class Probe:
    """Well-behaved clients in a process of their own, measuring while an attack runs."""

    def __init__(self, http_url: str, grpc_target: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, self._child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_main, args=(http_url, grpc_target, self._child), daemon=True
        )
        self.started_at = 0.0
        """Wall-clock time (``time.time()``) of the probe's t = 0."""

    def start(self, timeout_s: float = 30.0) -> None:
        self._proc.start()
        self._child.close()  # the probe process holds its own end
        if not self._conn.poll(timeout_s):
            self._proc.kill()
            raise RuntimeError("the probe clients could not reach the gateway")
        _, self.started_at = self._conn.recv()

    def stop(self, timeout_s: float = 30.0) -> Samples:
        self._conn.send("stop")
        if not self._conn.poll(timeout_s):
            self._proc.kill()
            raise RuntimeError("the probe did not stop")
        _, samples = self._conn.recv()
        self._proc.join(timeout_s)
        self._conn.close()
        return samples  # type: ignore[no-any-return]
