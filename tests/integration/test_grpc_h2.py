"""gRPC on uvicorn's HTTP/2: what this stack adds to the frontend both stacks pass
(test_grpc_frontend.py): connections retired before zttp's budgets, its limits, and the
answers to requests that are not well-formed gRPC calls, on loopback with real clients."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import zttp
from tritonclient.grpc import service_pb2, service_pb2_grpc

from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.frontends.connections import ConnectionLimits
from ensemble.frontends.grpc_h2 import start_h2_grpc_server as start
from ensemble.frontends.h2_connections import RETIRE_AFTER_RESETS, RETIRE_AFTER_STREAMS
from ensemble.frontends.limits import RequestLimits
from ensemble.metrics import GatewayMetrics
from ensemble.types import InferRequest, InferResponse
from tests.integration.test_grpc_frontend import MAX_MESSAGE_BYTES, X
from tests.integration.test_grpc_frontend import dispatcher as dispatcher

pytestmark = pytest.mark.integration

SERVICE = "/inference.GRPCInferenceService/"


class SlowDispatcher(Dispatcher):
    """Answers inference after ``delay_s`` (0: at once), a request with id "kept" after
    ``kept_s``; counts the calls running at once."""

    delay_s = 0.0
    kept_s = 0.0
    running = 0
    most = 0

    async def infer(self, request: InferRequest, protocol: str) -> InferResponse:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.kept_s if request.id == "kept" else self.delay_s)
            return await super().infer(request, protocol)
        finally:
            self.running -= 1


def infer_request(request_id: str = "") -> Any:
    request = service_pb2.ModelInferRequest(model_name="iris", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.astype(np.float32).tobytes())
    return request


@contextlib.asynccontextmanager
async def served(
    dispatcher: Dispatcher,
    limits: ConnectionLimits | None = None,
    requests: RequestLimits | None = None,
) -> AsyncIterator[int]:
    """The stack serving ``dispatcher`` on a free port (yielded), stopped on exit."""
    server, port = await start(
        dispatcher,
        "127.0.0.1",
        0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        connections=limits,
        limits=requests,
    )
    try:
        yield port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def stub_of(dispatcher: Dispatcher) -> AsyncIterator[Any]:
    """A grpc.aio stub on one channel to the stack serving ``dispatcher``."""
    async with (
        served(dispatcher) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def slow(dispatcher: Dispatcher) -> SlowDispatcher:
    return SlowDispatcher(dispatcher.repository, GatewayMetrics())


# -- connections retired before zttp's lifetime budgets ----------------------------------


def test_a_long_lived_connection_outlives_the_stream_budget(
    dispatcher: Dispatcher,
) -> None:
    """More calls than zttp lets one connection open; a slow call in flight across each
    retirement still answers, and no call fails: clients move to new connections."""
    slow_one = slow(dispatcher)
    slow_one.delay_s = 0.5

    async def scenario() -> None:
        async with stub_of(slow_one) as stub:
            failures: list[str] = []
            crossing = []
            calls = RETIRE_AFTER_STREAMS + 1000

            async def live(n: int) -> None:
                for _ in range(n):
                    try:
                        await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"{exc.code()}: {exc.details()}")

            for _ in range(3):  # a slow call in flight while the budget runs out
                crossing.append(asyncio.ensure_future(stub.ModelInfer(infer_request())))
            await asyncio.gather(*(live(calls // 16) for _ in range(16)))
            answers = await asyncio.gather(*crossing, return_exceptions=True)
            assert failures == [], failures[:3]
            assert all(isinstance(a, service_pb2.ModelInferResponse) for a in answers), answers

    run(scenario)


def test_cancelled_calls_do_not_fail_calls_in_flight(
    dispatcher: Dispatcher,
) -> None:
    """More cancelled calls (client resets) than zttp's budget on one connection: the
    connection is retired in time, so a call in flight across it still answers."""
    slow_one = slow(dispatcher)
    slow_one.delay_s = 0.1  # the cancelled calls run on briefly: fewer than 128 at once
    slow_one.kept_s = 2.0

    async def scenario() -> None:
        async with stub_of(slow_one) as stub:
            kept = asyncio.ensure_future(stub.ModelInfer(infer_request("kept")))
            cancelled = 0
            for _ in range(40):  # bounded: enough rounds on a slow machine too
                if cancelled > RETIRE_AFTER_RESETS + 60:
                    break
                calls = [stub.ModelInfer(infer_request()) for _ in range(30)]
                await asyncio.sleep(0.05)  # sent, and waiting on the slow dispatcher
                for call in calls:
                    cancelled += call.cancel()
            assert cancelled > RETIRE_AFTER_RESETS
            answer = await kept
            assert answer.model_name == "iris"
            live = await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
            assert live.live

    run(scenario)


def test_connections_past_their_age_are_retired_without_failing_calls(
    dispatcher: Dispatcher,
) -> None:
    """``grpc_max_connection_age_s``: connections are retired (counted) while calls run, the
    client moves to new ones, and no call fails."""
    limits = ConnectionLimits(grpc_max_connection_age_s=0.2)
    metrics = dispatcher.metrics

    async def scenario() -> None:
        async with (
            served(dispatcher, limits) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            ends = time.monotonic() + 1.5
            answered = 0
            while time.monotonic() < ends:
                await stub.ModelInfer(infer_request(), timeout=10)
                answered += 1
            assert answered > 10

    before = metrics.connections_closed.get(("grpc", "max_age"), 0)
    run(scenario)
    assert metrics.connections_closed.get(("grpc", "max_age"), 0) - before >= 3


def test_reset_streams_start_no_more_calls_than_open_ones_could(
    dispatcher: Dispatcher,
) -> None:
    """Rapid Reset: streams reset once their calls started, then new ones opened, faster than
    the calls end. The calls running on one connection stay within the stream cap (128), not
    200, and the connection is retired gracefully (GOAWAY NO_ERROR) before zttp's reset
    budget."""
    slow_one = slow(dispatcher)
    slow_one.delay_s = 2.0
    body = framed(infer_request().SerializeToString())

    def attack(port: int) -> list[int]:
        """Twice: open 100 calls, let them start, reset them all (200 resets)."""
        client = RawH2(port)
        try:
            for _ in range(2):
                streams = []
                for _ in range(100):
                    stream = client.conn.send_request(
                        b"POST", (SERVICE + "ModelInfer").encode(), b"HTTP/2", GRPC
                    )
                    stream.send_data(body)
                    stream.end_message()
                    streams.append(stream)
                client.sock.sendall(client.conn.data_to_send())
                client.drain_goaways(0.3)  # the calls start on the slow dispatcher
                for stream in streams:
                    stream.reset(0x8)  # CANCEL
                client.sock.sendall(client.conn.data_to_send())
            return client.drain_goaways(0.5)
        finally:
            client.close()

    async def scenario() -> None:
        async with served(slow_one) as port:
            goaways = await asyncio.to_thread(attack, port)
            assert goaways and set(goaways) == {0}, goaways  # NO_ERROR, never ENHANCE_YOUR_CALM
            assert 100 <= slow_one.most <= 128

    run(scenario)


# -- requests that are not well-formed gRPC calls ----------------------------------------


class RawH2:
    """An HTTP/2 client by hand (zttp's client role), for requests gRPC clients never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = zttp.Connection(zttp.CLIENT, protocol=zttp.HTTP2)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())  # the preface: the handshake begins

    def call(
        self,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        method: bytes = b"POST",
        end: bool = True,
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """(HTTP status, headers and trailers, body) of one request (``end``: False leaves
        the request body unfinished)."""
        stream = self.conn.send_request(method, path.encode(), b"HTTP/2", headers)
        if body:
            stream.send_data(body)
        if end:
            stream.end_message()
        self.sock.sendall(self.conn.data_to_send())
        status, fields, data = 0, {}, b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.conn.receive_data(chunk)
            while (event := self.conn.next_event()) is not zttp.NEED_DATA:
                if isinstance(event, zttp.Response) and event.stream_id == stream.stream_id:
                    status = event.status_code
                    fields.update(dict(event.headers))
                elif isinstance(event, zttp.Data) and event.stream_id == stream.stream_id:
                    data += event.data
                elif isinstance(event, zttp.EndOfMessage) and event.stream_id == stream.stream_id:
                    fields.update(dict(event.trailers))
                    return status, fields, data
            pending = self.conn.data_to_send()
            if pending:
                self.sock.sendall(pending)
        raise AssertionError("no answer")

    def drain_goaways(self, seconds: float) -> list[int]:
        """The error codes of the GOAWAYs that arrive within ``seconds`` (the rest dropped)."""
        codes = []
        self.sock.settimeout(seconds)
        try:
            while chunk := self.sock.recv(65536):
                self.conn.receive_data(chunk)
                while (event := self.conn.next_event()) is not zttp.NEED_DATA:
                    if isinstance(event, zttp.GoAway):
                        codes.append(event.error_code)
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(10)
        return codes

    def close(self) -> None:
        self.sock.close()


GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def framed(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


LIVE = service_pb2.ServerLiveRequest().SerializeToString()


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "grpc_status", "message"),
    [
        (b"GET", "ServerLive", GRPC, b"", 405, None, b"POST"),
        (b"POST", "ServerLive", [(b"content-type", b"text/plain")], b"", 415, None, b"grpc"),
        (b"POST", "ServerLive", GRPC[:1], framed(LIVE), 400, None, b"trailers"),
        (b"POST", "Nothing", GRPC, framed(LIVE), 200, b"12", b"not found"),
        (b"POST", "ServerLive", GRPC, framed(LIVE, 1), 200, b"13", b"compressed"),
        (b"POST", "ServerLive", GRPC, framed(LIVE) * 2, 200, b"13", b"one message"),
        (b"POST", "ServerLive", GRPC, b"\x00\x00", 200, b"13", b"one message"),
        (
            b"POST",
            "ServerLive",
            [*GRPC, (b"grpc-encoding", b"br")],
            framed(LIVE),
            200,
            b"12",
            b"identity,deflate,gzip",
        ),
        (
            b"POST",
            "ServerLive",
            [*GRPC, (b"grpc-encoding", b"gzip")],
            framed(gzip.compress(b"\0" * (MAX_MESSAGE_BYTES + 1)), 1),
            200,
            b"8",
            b"inflates past max",
        ),
        (
            b"POST",
            "ServerLive",
            [*GRPC, (b"grpc-encoding", b"gzip")],
            framed(b"not gzip", 1),
            200,
            b"13",
            b"corrupt",
        ),
        (
            b"POST",
            "ServerLive",
            [*GRPC, (b"grpc-timeout", b"soon")],
            framed(LIVE),
            200,
            b"3",
            b"grpc-timeout",
        ),
        (b"POST", "ModelInfer", GRPC, framed(b"\xff" * 9), 200, b"3", b"malformed"),
        (
            b"POST",
            "ServerLive",
            [*GRPC, (b"x-big", b"v" * 40_000)],
            framed(LIVE),
            200,
            b"8",
            b"max_header_bytes",
        ),
        (b"POST", "ServerLive", GRPC, framed(b"x" * (MAX_MESSAGE_BYTES + 1)), 200, b"8", b"max"),
    ],
)
def test_requests_that_are_not_well_formed_calls_get_clear_answers(
    dispatcher: Dispatcher,
    method: bytes,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    status: int,
    grpc_status: bytes | None,
    message: bytes,
) -> None:
    async def scenario() -> None:
        async with served(dispatcher, ConnectionLimits(max_header_bytes=32 * 1024)) as port:
            client = RawH2(port)
            try:
                got = await asyncio.to_thread(client.call, SERVICE + path, body, headers, method)
                code, fields, data = got
                assert code == status
                if grpc_status is None:
                    assert message in data
                else:
                    assert fields[b"grpc-status"] == grpc_status
                    assert message in fields[b"grpc-message"]
                # the connection still serves a good call afterwards
                code, fields, _ = await asyncio.to_thread(
                    client.call, SERVICE + "ServerLive", framed(LIVE), GRPC
                )
                assert (code, fields[b"grpc-status"]) == (200, b"0")
            finally:
                client.close()

    run(scenario)


@pytest.mark.parametrize("sent", [20, 0], ids=["part of a message", "headers alone"])
def test_a_message_that_trickles_in_is_cut_off(dispatcher: Dispatcher, sent: int) -> None:
    """A call whose message never finishes arriving, or never begins to, ends at
    ``read_timeout_s``."""
    requests = RequestLimits(max_bytes=MAX_MESSAGE_BYTES, read_timeout_s=0.3)

    async def scenario() -> None:
        async with served(dispatcher, requests=requests) as port:
            client = RawH2(port)
            try:
                half = framed(LIVE + b"\0" * 64)[:sent]
                started = time.monotonic()
                code, fields, _ = await asyncio.to_thread(
                    client.call, SERVICE + "ServerLive", half, GRPC, b"POST", False
                )
                assert (code, fields[b"grpc-status"]) == (200, b"4")
                assert b"read_timeout_s" in fields[b"grpc-message"]
                assert time.monotonic() - started < 5
            finally:
                client.close()

    run(scenario)


def test_the_deadline_a_call_sends_is_kept(dispatcher: Dispatcher) -> None:
    slow_one = slow(dispatcher)
    slow_one.delay_s = 5.0

    async def scenario() -> None:
        async with stub_of(slow_one) as stub:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(infer_request(), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 3

    run(scenario)


# -- connection limits -------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (anything it sends first is
    read and dropped: its SETTINGS, a GOAWAY)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (TimeoutError, ConnectionResetError):
        return False
    return False


def test_connection_limits_hold(dispatcher: Dispatcher) -> None:
    limits = ConnectionLimits(max_connections=2, header_timeout_s=0.3)

    async def scenario() -> None:
        async with served(dispatcher, limits) as port:
            silent = socket.create_connection(("127.0.0.1", port), timeout=5)
            speaking = RawH2(port)
            try:
                assert await asyncio.to_thread(_closed_within, silent, 3), "handshake timeout"
                # the cap: one connection open now, one more fits, the one after is closed
                second = RawH2(port)
                third = socket.create_connection(("127.0.0.1", port), timeout=5)
                assert await asyncio.to_thread(_closed_within, third, 3), "connection cap"
                code, fields, _ = await asyncio.to_thread(
                    speaking.call, SERVICE + "ServerLive", framed(LIVE), GRPC
                )
                assert (code, fields[b"grpc-status"]) == (200, b"0")
                second.close()
                third.close()
            finally:
                silent.close()
                speaking.close()

    run(scenario)


def _zero_window_calls(port: int, calls: int) -> RawH2:
    """A client that sets its receive window to 0 (answers cannot leave) and sends
    ``calls`` calls without reading."""
    client = RawH2(port)
    params = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    client.sock.sendall(struct.pack(">I", len(params))[1:] + b"\x04\x00" + bytes(4) + params)
    for _ in range(calls):
        stream = client.conn.send_request(
            b"POST", SERVICE.encode() + b"ServerLive", b"HTTP/2", GRPC
        )
        stream.send_data(framed(LIVE))
        stream.end_message()
        client.sock.sendall(client.conn.data_to_send())
    return client


@pytest.mark.parametrize(
    ("calls", "within_s"),
    [(100, 5.0), (400, 3.0)],
    ids=["under the stream cap: closed when idle", "past it: refused, then retired"],
)
def test_a_client_that_never_reads_its_answers_holds_nothing_for_long(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture, calls: int, within_s: float
) -> None:
    """Answers a client's zero window holds back keep their streams open: past the stream
    cap the next ones are refused and, with the refusals counted as resets, the connection
    is retired; under it, the connection is closed at the idle timeout."""
    limits = ConnectionLimits(idle_timeout_s=1.0)

    async def scenario() -> None:
        async with served(dispatcher, limits) as port:
            client = await asyncio.to_thread(_zero_window_calls, port, calls)
            try:
                assert await asyncio.to_thread(_closed_within, client.sock, within_s)
            finally:
                client.close()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    run(scenario)
