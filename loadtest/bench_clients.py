"""The benchmark's load clients besides wrk: closed-loop gRPC in generator processes, and
open-loop HTTP at a fixed rate on the harness's HTTP client (`loadtest.httpclient`)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import uvloop
from tritonclient.grpc import service_pb2

from loadtest.httpclient import HttpPool

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class LoadResult:
    """One measurement by one of these clients, in the same terms as a wrk result."""

    requests: int
    duration_s: float
    rps: float
    latency_ms: dict[str, float]
    errors: int = 0
    error_sample: str | None = None
    generator_cpu_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def latency_summary(latencies_s: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean and max in milliseconds (empty when nothing completed)."""
    if latencies_s.size == 0:
        return {}
    ms = latencies_s * 1e3
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p99.9": float(p999),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def _test_image(zoo: Path) -> np.ndarray:
    x: np.ndarray = np.load(zoo / "test.npz")["X"][:1].astype("<f4")
    return x


def oip_http_body(zoo: Path) -> tuple[bytes, int]:
    """The first test image as an OIP binary-extension body, and its JSON header's length."""
    x = _test_image(zoo)
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(x.shape),
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = orjson.dumps({"inputs": [tensor]})
    return header + x.tobytes(), len(header)


def oip_http_headers(header_length: int) -> dict[str, str]:
    """The headers that send a binary-extension body of ``oip_http_body``."""
    return {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }


def oip_grpc_body(zoo: Path, model: str = "digits") -> bytes:
    """The same image as a serialised ModelInferRequest with raw contents."""
    x = _test_image(zoo)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=list(x.shape)
    )
    request = service_pb2.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]
    )
    return bytes(request.SerializeToString())


# -- closed-loop gRPC, several processes ------------------------------------------------------


async def _grpc_drive(
    target: str, body: bytes, concurrency: int, warm_until: float, end: float
) -> tuple[bytes, int, str | None, float]:
    """``concurrency`` callers back to back over the process's channels; latencies inside
    [warm_until, end]."""
    loop = asyncio.get_running_loop()
    latencies = array("d")
    errors = 0
    sample: str | None = None
    cpu: list[float] = []
    loop.call_later(
        max(0.0, warm_until - time.monotonic()), lambda: cpu.append(time.process_time())
    )
    if target not in _CHANNELS:  # kept across runs: the warm-up run has already connected
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each, not one shared
        _CHANNELS[target] = [
            grpc.aio.insecure_channel(target, options=own) for _ in range(CHANNELS_PER_PROCESS)
        ]
    # Raw bytes in and out: the request is serialised once by the bench, so the generator spends
    # its CPU on gRPC itself and not on protobuf.
    calls = [channel.unary_unary(MODEL_INFER) for channel in _CHANNELS[target]]

    async def caller(call: Any) -> None:
        nonlocal errors, sample
        while (start := time.monotonic()) < end:
            try:
                await call(body, timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                if start >= warm_until:
                    errors += 1
                    sample = sample or f"{exc.code().name}: {exc.details()}"
                continue
            done = time.monotonic()
            if start >= warm_until and done <= end:
                latencies.append(done - start)

    await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(concurrency)))
    cpu_s = time.process_time() - (cpu[0] if cpu else time.process_time())
    return latencies.tobytes(), errors, sample, cpu_s


CHANNELS_PER_PROCESS = 4
"""Connections per generator process and target: a gateway of several workers gets connections
spread by the kernel (SO_REUSEPORT), so several are needed for each worker to get its share
(two processes of two each would put all four on one of two workers one run in eight)."""
_CHANNELS: dict[str, list[grpc.aio.Channel]] = {}
"""Per generator process: its channels (one HTTP/2 connection each) per target."""


def _grpc_worker(conn: Connection) -> None:
    # One event loop for the process's life: grpc.aio channels belong to the loop that made them.
    loop = asyncio.new_event_loop()
    try:
        while (job := conn.recv()) is not None:
            conn.send(loop.run_until_complete(_grpc_drive(*job)))
        for channels in _CHANNELS.values():
            for channel in channels:
                loop.run_until_complete(channel.close())
    finally:
        loop.close()


class GrpcLoad:
    """Generator processes driving ModelInfer closed-loop over grpc.aio (one Python process
    cannot saturate a gRPC server, so the concurrency is split across processes)."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork after grpc is imported is unsafe
        self._workers: list[tuple[Any, Connection]] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_grpc_worker, args=(child,), name=f"grpc-gen-{i}")
            proc.start()
            self._workers.append((proc, parent))

    def run(
        self, target: str, body: bytes, concurrency: int, warmup_s: float, duration_s: float
    ) -> LoadResult:
        workers = self._workers[: min(len(self._workers), concurrency)]
        shares = [
            concurrency // len(workers) + (i < concurrency % len(workers))
            for i in range(len(workers))
        ]
        warm_until = time.monotonic() + 0.1 + warmup_s  # 0.1 s for the jobs to reach the workers
        end = warm_until + duration_s
        for (_, conn), share in zip(workers, shares, strict=True):
            conn.send((target, body, share, warm_until, end))
        latencies: list[np.ndarray] = []
        errors, sample, cpu = 0, None, 0.0
        for proc, conn in workers:
            if not conn.poll(end - time.monotonic() + 60):
                raise RuntimeError(f"gRPC generator {proc.name} did not report back")
            raw, errs, err_sample, cpu_s = conn.recv()
            latencies.append(np.frombuffer(raw, dtype=np.float64))
            errors += errs
            sample = sample or err_sample
            cpu += cpu_s
        merged = np.concatenate(latencies)
        return LoadResult(
            requests=int(merged.size),
            duration_s=duration_s,
            rps=merged.size / duration_s,
            latency_ms=latency_summary(merged),
            errors=errors,
            error_sample=sample,
            generator_cpu_s=cpu,
            extra={"processes": float(len(workers))},
        )

    def close(self) -> None:
        for proc, conn in self._workers:
            conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


# -- open-loop HTTP, on the harness's own client ----------------------------------------------


@dataclass
class _OpenLoop:
    """The bookkeeping of one open-loop run: what was sent, answered, failed, and when."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    lags: array[float] = field(default_factory=lambda: array("d"))
    errors: list[str] = field(default_factory=list)
    outstanding: int = 0
    last_done: float = 0.0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, pool: HttpPool, raw: bytes, intended: float, record: bool) -> None:
        sent = time.perf_counter()
        self.outstanding += 1
        self.idle.clear()

        def done(status: int, _hlen: int | None, _body: bytes, err: str | None) -> None:
            finished = time.perf_counter()
            self.outstanding -= 1
            if not self.outstanding:
                self.idle.set()
            if not record:
                return
            if err is not None:
                self.errors.append(err)
                return
            if not 200 <= status < 300:
                self.errors.append(f"HTTP {status}")
            # Late sends (a busy client) and waits for a connection count from the intended
            # time, so a slow server cannot hide its queue behind a slowed-down client (wrk2).
            self.latencies.append(finished - min(intended, sent))
            self.lags.append(max(0.0, sent - intended))
            self.last_done = max(self.last_done, finished)

        pool.send(raw, done)


async def _open_loop(
    host: str,
    port: int,
    raw: bytes,
    rate: float,
    warmup_s: float,
    duration_s: float,
    max_connections: int,
    grace_s: float,
) -> LoadResult:
    n_warm = int(warmup_s * rate)
    n_total = n_warm + int(duration_s * rate)
    # No request times out before the grace after the last send has run out.
    pool = HttpPool(host, port, max_connections, warmup_s + duration_s + grace_s + 60)
    book = _OpenLoop()
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    start = time.perf_counter() + 0.05
    cpu_start, burst = 0.0, 0
    for i in range(n_total):
        intended = start + i / rate
        if i == n_warm:
            cpu_start = time.process_time()
        # Timers fire on millisecond ticks: wake up to 1 ms early rather than always late.
        delay = intended - time.perf_counter() - 0.001
        if delay > 0:
            burst = 0
            await asyncio.sleep(delay)
        elif burst >= 64:  # behind schedule: let answers in between sends
            burst = 0
            await asyncio.sleep(0)
        burst += 1
        book.send(pool, raw, intended, i >= n_warm)
    if book.outstanding:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(book.idle.wait(), grace_s)
    cpu = time.process_time() - cpu_start
    unfinished = book.outstanding
    await pool.close()
    done = np.frombuffer(book.latencies, dtype=np.float64)
    lag = np.frombuffer(book.lags, dtype=np.float64) * 1e3 if book.lags else np.zeros(1)
    # Achieved rate over the time the answers took to arrive: an overloaded server answers the
    # same number of requests, but over a longer span than the sending window.
    span = max(duration_s, book.last_done - (start + n_warm / rate))
    return LoadResult(
        requests=int(done.size),
        duration_s=span,
        rps=done.size / span,
        latency_ms=latency_summary(done),
        errors=len(book.errors),
        error_sample=book.errors[0] if book.errors else None,
        generator_cpu_s=cpu,
        extra={
            "offered_rps": rate,
            "unfinished": float(unfinished),
            "connections": float(pool.opened),
            "connection_waits": float(pool.queued),
            "client_lag_p99_ms": float(np.percentile(lag, 99)),
        },
    )


def run_open_loop(
    host: str,
    port: int,
    raw: bytes,
    rate: float,
    warmup_s: float,
    duration_s: float,
    *,
    max_connections: int = 64,
    grace_s: float = 5.0,
) -> LoadResult:
    """Send ``raw`` (pre-encoded request bytes) at a fixed ``rate`` whatever the answers do
    (open loop), over at most ``max_connections`` keep-alive connections of the harness's
    HTTP client; requests still unanswered ``grace_s`` after the last send are dropped and
    reported as ``unfinished``."""
    return uvloop.run(
        _open_loop(host, port, raw, rate, warmup_s, duration_s, max_connections, grace_s)
    )
