"""Connection limits through a real gateway: a cap per frontend that idle connections cannot
fill, head and idle timeouts, a head size limit, a body read timeout; every close counted."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import wait_for
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
CAP = 8


SERVER = {
    "max_connections": CAP,
    "header_timeout_s": 0.5,
    "idle_timeout_s": 1.0,
    "read_timeout_s": 0.5,
    "write_timeout_s": 1.0,
    "max_header_bytes": 4096,
    "max_batch_size": 2000,
}


def limited_gateway(tmp: Path, **server: object) -> Iterator[GatewayProcess]:
    config = {
        "server": {**SERVER, **server},
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    gateway = start_from_config(config, tmp)
    yield gateway
    assert gateway.stop() == 0, gateway.log()
    assert "Traceback" not in gateway.log(), gateway.log()


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from limited_gateway(tmp_path_factory.mktemp("conns"))


@pytest.fixture(scope="module")
def gw_h2(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The same limits, gRPC served by the uvicorn stack."""
    yield from limited_gateway(tmp_path_factory.mktemp("conns-h2"), grpc_stack="uvicorn")


def closed_count(gw: GatewayProcess, reason: str, protocol: str = "http") -> float:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    key = f'ensemble_connections_closed_total{{protocol="{protocol}",reason="{reason}"}}'
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(key))


def connect(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection((gw.host, gw.http_port), timeout=5)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` within ``within_s`` (polled, bounded)."""
    sock.settimeout(within_s)
    try:
        for _ in range(100):  # an answer, if any, then the close
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
    return False


def response(sock: socket.socket) -> bytes:
    """One whole HTTP response: its head, then as many body bytes as it announces (a server
    may send them in separate writes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_idle_connections_cannot_lock_out_new_clients(gw: GatewayProcess) -> None:
    evicted = closed_count(gw, "evicted")
    with httpx.Client(base_url=gw.http_url, timeout=10) as established:
        assert established.get("/v2/health/ready").status_code == 200
        idle = [connect(gw) for _ in range(3 * CAP)]  # never send a byte
        try:
            # A new client is served: the oldest connections that never sent a request
            # make room, not the established client between its requests.
            with httpx.Client(base_url=gw.http_url, timeout=10) as newcomer:
                assert newcomer.get("/v2/health/ready").status_code == 200
            assert established.get("/v2/health/ready").status_code == 200
        finally:
            for sock in idle:
                sock.close()
    assert closed_count(gw, "evicted") - evicted >= 2 * CAP


def test_slow_head_is_closed_at_the_header_timeout(gw: GatewayProcess) -> None:
    before = closed_count(gw, "header_timeout")
    with connect(gw) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        assert closed_by_server(sock, within_s=10)
    deadline = time.monotonic() + 10
    while closed_count(gw, "header_timeout") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed_count(gw, "header_timeout") == before + 1


def test_silent_connection_is_closed_at_the_header_timeout(gw: GatewayProcess) -> None:
    with connect(gw) as sock:
        assert closed_by_server(sock, within_s=10)


def test_idle_keep_alive_connection_is_closed(gw: GatewayProcess) -> None:
    before = closed_count(gw, "idle_timeout")
    with connect(gw) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock, within_s=10)
    assert closed_count(gw, "idle_timeout") == before + 1


def test_oversized_head_gets_431(gw: GatewayProcess) -> None:
    with connect(gw) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        sock.settimeout(5)
        answer = response(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer
    assert b"server.max_header_bytes" in answer


def test_slow_body_gets_408(gw: GatewayProcess) -> None:
    with connect(gw) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        sock.settimeout(10)
        answer = response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"server.read_timeout_s" in answer


def test_grpc_refuses_past_its_cap_and_closes_idle_connections(gw: GatewayProcess) -> None:
    idle = [socket.create_connection((gw.host, gw.grpc_port), timeout=5) for _ in range(2 * CAP)]
    try:
        # gRPC core closes what exceeds the cap at once, and the rest (never a byte sent)
        # once they were idle for idle_timeout_s.
        closed = [closed_by_server(sock, within_s=10) for sock in idle]
        assert all(closed)
    finally:
        for sock in idle:
            sock.close()
    client = grpcclient.InferenceServerClient(gw.grpc_target)
    assert client.is_server_live()
    client.close()


def test_the_uvicorn_grpc_stack_makes_room_and_times_out_silent_connections(
    gw_h2: GatewayProcess,
) -> None:
    """Twice the cap in sockets that never speak HTTP/2: a gRPC client is served meanwhile
    (the oldest silent one is closed to make room, as on the HTTP frontend), and every silent
    socket is closed, to make room or after header_timeout_s; both counted."""
    evicted = closed_count(gw_h2, "evicted", "grpc")
    idle = [
        socket.create_connection((gw_h2.host, gw_h2.grpc_port), timeout=5) for _ in range(2 * CAP)
    ]
    try:
        client = grpcclient.InferenceServerClient(gw_h2.grpc_target)
        try:
            assert client.is_server_live()
        finally:
            client.close()
        assert all(closed_by_server(sock, within_s=10) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert closed_count(gw_h2, "evicted", "grpc") - evicted >= CAP
    assert closed_count(gw_h2, "header_timeout", "grpc") >= 1


def test_idle_grpc_clients_make_room_and_reconnect(gw_h2: GatewayProcess) -> None:
    """The cap filled with gRPC clients idle between calls: one more client is served (the
    longest idle is closed), and that one's next call reconnects and is served too."""
    evicted = closed_count(gw_h2, "evicted", "grpc")
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each, not one shared
    clients = [
        grpcclient.InferenceServerClient(gw_h2.grpc_target, channel_args=own)
        for _ in range(CAP + 1)
    ]
    try:
        for client in clients:  # one connection each; the last one finds the frontend full
            assert client.is_server_live()
        assert closed_count(gw_h2, "evicted", "grpc") - evicted >= 1
        assert clients[0].is_server_live()  # closed to make room, it reconnects
    finally:
        for client in clients:
            client.close()


def test_a_client_that_never_reads_its_answers_is_closed_at_the_write_timeout(
    gw: GatewayProcess,
) -> None:
    """Requests pipelined for large answers, none read: the answer waits on full buffers, in
    a request (so never closed to make room), until write_timeout_s closes the connection."""
    before = closed_count(gw, "write_timeout")
    rows = {"name": "input", "shape": [2000, 64], "datatype": "FP32", "data": [0.5] * 128_000}
    body = json.dumps({"inputs": [rows]}).encode()
    head = (
        b"POST /v2/models/logreg/infer HTTP/1.1\r\nhost: gw\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect((gw.host, gw.http_port))
    try:
        with contextlib.suppress(TimeoutError, OSError):  # the gateway stops reading too
            sock.sendall((head + body) * 20)
        wait_for(
            lambda: closed_count(gw, "write_timeout") > before,
            "the connection closed for its unread answers",
            timeout_s=20,
        )
    finally:
        sock.close()


def test_a_grpc_connection_closed_to_make_room_is_told_with_goaway(gw_h2: GatewayProcess) -> None:
    """The cap filled with connections that spoke HTTP/2 and went idle: the oldest, closed to
    make room, gets GOAWAY (NO_ERROR, naming the last stream served) before the close, so a
    call its client started meanwhile is retried elsewhere rather than failed."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    idle = []
    try:
        for _ in range(CAP):
            sock = socket.create_connection((gw_h2.host, gw_h2.grpc_port), timeout=5)
            sock.sendall(preface)
            idle.append(sock)
        time.sleep(0.2)  # the prefaces are read: each connection is idle between calls
        newcomer = socket.create_connection((gw_h2.host, gw_h2.grpc_port), timeout=5)
        try:
            received = b""
            while chunk := idle[0].recv(65536):  # until the gateway closes it
                received += chunk
        finally:
            newcomer.close()
        kinds = []
        while len(received) >= 9:  # HTTP/2 frames: 3-byte length, type, flags, stream id
            length = int.from_bytes(received[:3], "big")
            kinds.append(received[3])
            received = received[9 + length :]
        assert 7 in kinds, kinds  # GOAWAY
    finally:
        for sock in idle:
            sock.close()
