"""A no-op OIP server on the gateway's stack (uvicorn, httptools, uvloop; grpc.aio, or with
`--grpc-stack uvicorn` the gateway's gRPC on uvicorn's HTTP/2; with `--http-stack gateway` the
gateway's HTTP protocol on uvicorn): the ceiling."""

# It reads each request body and answers a fixed, small OIP response of the gateway's shape, so
# what it sustains is the most any Python server on this stack can do on this machine. Run as
# `python -m loadtest.peers.noop`: prints `noop ready: http=H:P grpc=H:P grpcio=VERSION` (or
# `zttp=VERSION`), exits 0 on SIGTERM. With `--handler-cpu-us N` each handler first keeps the
# event loop busy for N us, as a real server's work would (what the stack itself costs around a
# busy loop: loadtest.stack_cost).

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib.metadata import version
from typing import Any, TypeAlias

import grpc
import orjson
import uvicorn
import uvloop
from tritonclient.grpc import service_pb2

Scope: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PROBABILITIES = [0.91, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
RESPONSE = orjson.dumps(
    {
        "model_name": "digits",
        "model_version": "1",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": PROBABILITIES},
        ],
        "parameters": {"policy": "noop"},
    }
)
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(RESPONSE)).encode()),
]
GRPC_RESPONSE: bytes = service_pb2.ModelInferResponse(
    model_name="digits",
    model_version="1",
    outputs=[
        service_pb2.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1]),
        service_pb2.ModelInferResponse.InferOutputTensor(
            name="probabilities", datatype="FP32", shape=[1, 10]
        ),
    ],
    raw_output_contents=[bytes(8), bytes(40)],
).SerializeToString()


HANDLER_CPU_S = 0.0
"""Loop time each handler spends before answering (``--handler-cpu-us``; 0: none)."""


def _work() -> None:
    if HANDLER_CPU_S:
        end = time.perf_counter() + HANDLER_CPU_S
        while time.perf_counter() < end:
            pass


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: read the whole body (as a real server must), answer the fixed response."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    _work()
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})


async def _model_infer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    _work()
    return GRPC_RESPONSE


class _Serialized:
    """The fixed response, already serialized: the no-op does no protobuf work."""

    def SerializeToString(self) -> bytes:
        return GRPC_RESPONSE


_SERIALIZED = _Serialized()


async def _model_infer_h2(request: bytes, call: Any) -> _Serialized:
    _work()
    return _SERIALIZED


async def _start_grpcio(host: str, port: int) -> tuple[Callable[[], Awaitable[None]], int]:
    # Raw bytes in and out, like the gateway's handlers: no protobuf work on the no-op path.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(_model_infer)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": handler}
            ),
        )
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return lambda: server.stop(1.0), bound


async def _start_uvicorn(host: str, port: int) -> tuple[Callable[[], Awaitable[None]], int]:
    """The gateway's uvicorn gRPC stack (its framing and HTTP/2 protocol) around the no-op."""
    from ensemble.frontends.connections import ConnectionLimits, QuietUvicorn, listen
    from ensemble.frontends.grpc_h2 import GrpcApp, H2GrpcServer
    from ensemble.frontends.h2_connections import GatewayH2Protocol, H2Guard
    from ensemble.metrics import GatewayMetrics

    app = GrpcApp({"ModelInfer": (_model_infer_h2, None)}, max_message_bytes=64 * 1024 * 1024)
    protocol: Any = functools.partial(
        GatewayH2Protocol, guard=H2Guard(ConnectionLimits(), GatewayMetrics())
    )
    server = QuietUvicorn.of(
        app, protocol, idle_timeout_s=30, drain_timeout_s=1, http_headers=False
    )
    sock = listen(host, port)
    running = H2GrpcServer(server, await server.start(sock), sock)
    return lambda: running.stop(1.0), sock.getsockname()[1]


async def _start_http(
    host: str, port: int, http_stack: str
) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """Stock uvicorn with httptools, or the gateway's HTTP protocol (its connection limits
    and coalesced writes) as the gateway configures uvicorn; either without uvicorn's signal
    handling, so SIGTERM stops HTTP and gRPC together."""
    from ensemble.frontends.connections import (
        ConnectionGuard,
        ConnectionLimits,
        GatewayHttpProtocol,
        QuietUvicorn,
        listen,
    )

    if http_stack == "gateway":
        from ensemble.metrics import GatewayMetrics

        protocol: Any = functools.partial(
            GatewayHttpProtocol, guard=ConnectionGuard(ConnectionLimits(), GatewayMetrics())
        )
        server = QuietUvicorn.of(app, protocol, idle_timeout_s=30, drain_timeout_s=1)
    else:
        config = uvicorn.Config(
            app,
            lifespan="off",
            http="httptools",
            loop="none",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
        )
        server = QuietUvicorn(config)
    sock = listen(host, port)
    return server, await server.start(sock), sock.getsockname()[1]


async def serve(
    host: str,
    http_port: int,
    grpc_port: int,
    grpc_stack: str = "grpcio",
    http_stack: str = "uvicorn",
) -> int:
    http, http_task, port = await _start_http(host, http_port, http_stack)
    start = _start_uvicorn if grpc_stack == "uvicorn" else _start_grpcio
    stop_grpc, bound_grpc = await start(host, grpc_port)
    stack = f"grpcio={grpc.__version__}" if grpc_stack == "grpcio" else "zttp=" + version("zttp")
    ready = f"noop ready: http={host}:{port} grpc={host}:{bound_grpc} {stack}"
    print(ready, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.should_exit = True
    await asyncio.gather(stop_grpc(), http_task)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.peers.noop", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port; 0 picks a free one")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--handler-cpu-us",
        type=float,
        default=0.0,
        help="microseconds each handler keeps the event loop busy before answering (default 0)",
    )
    parser.add_argument(
        "--grpc-stack",
        choices=("grpcio", "uvicorn"),
        default="grpcio",
        help="what serves gRPC: grpc.aio (default) or the gateway's uvicorn gRPC stack",
    )
    parser.add_argument(
        "--http-stack",
        choices=("uvicorn", "gateway"),
        default="uvicorn",
        help="what serves HTTP: stock uvicorn with httptools (default) or the gateway's HTTP "
        "protocol on it (connection limits, coalesced writes)",
    )
    args = parser.parse_args(argv)
    if args.handler_cpu_us < 0:
        parser.error("--handler-cpu-us must be at least 0")
    global HANDLER_CPU_S
    HANDLER_CPU_S = args.handler_cpu_us * 1e-6
    return uvloop.run(
        serve(args.host, args.http_port, args.grpc_port, args.grpc_stack, args.http_stack)
    )


if __name__ == "__main__":
    sys.exit(main())
