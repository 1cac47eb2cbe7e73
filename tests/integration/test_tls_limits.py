"""Connection limits over TLS through a real gateway (HTTPS and gRPC on the uvicorn stack): a
TCP connection counts against the cap from its accept and has ``header_timeout_s`` to finish
its TLS handshake; handshakes that never finish cannot lock out clients; every close counted."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for
from tests.integration.process import GatewayProcess, start_from_config, zoo_member
from tests.integration.test_connection_limits import closed_by_server
from tests.integration.test_tls import Pki, grpcs_client, mint

pytestmark = pytest.mark.integration
CAP = 8
HEADER_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def gw(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Pki]]:
    tmp = tmp_path_factory.mktemp("tls-limits")
    pki = mint(tmp / "certs")
    config = {
        "server": {
            "tls": {"cert_file": "certs/server.pem", "key_file": "certs/server.key"},
            "grpc_stack": "uvicorn",
            "max_connections": CAP,
            "header_timeout_s": HEADER_TIMEOUT_S,
            "idle_timeout_s": 1.0,
            "read_timeout_s": 5.0,
        },
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    gateway = start_from_config(config, tmp)
    yield gateway, pki
    assert gateway.stop() == 0, gateway.log()
    assert "Traceback" not in gateway.log(), gateway.log()


def trusting(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


def https(gw: GatewayProcess, pki: Pki) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://{gw.host}:{gw.http_port}", verify=trusting(pki), timeout=10
    )


def closed_count(gw: GatewayProcess, pki: Pki, reason: str, protocol: str) -> float:
    text = ""

    def scraped() -> bool:  # a full frontend refuses until it sees clients' closes
        nonlocal text
        try:
            with https(gw, pki) as client:
                text = client.get("/metrics").text
        except httpx.TransportError:
            return False
        return True

    wait_for(scraped, "a scrape of /metrics", timeout_s=10, interval_s=0.1)
    key = f'ensemble_connections_closed_total{{protocol="{protocol}",reason="{reason}"}}'
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(key))


def ports(gw: GatewayProcess) -> list[tuple[str, int]]:
    return [("http", gw.http_port), ("grpc", gw.grpc_port)]


def test_a_connection_that_never_finishes_its_handshake_is_closed_in_time(
    gw: tuple[GatewayProcess, Pki],
) -> None:
    """Silent from its accept, or stalled halfway through a ClientHello: closed after
    header_timeout_s (asyncio's own bound is 60 s), counted as header_timeout."""
    gateway, pki = gw
    for protocol, port in ports(gateway):
        before = closed_count(gateway, pki, "header_timeout", protocol)
        silent = socket.create_connection((gateway.host, port), timeout=5)
        halfway = socket.create_connection((gateway.host, port), timeout=5)
        halfway.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        started = time.monotonic()
        try:
            assert closed_by_server(silent, within_s=10)
            assert closed_by_server(halfway, within_s=10)
            assert time.monotonic() - started < 4 * HEADER_TIMEOUT_S + 1
        finally:
            silent.close()
            halfway.close()
        assert closed_count(gateway, pki, "header_timeout", protocol) - before >= 2


def test_a_finished_handshake_then_silence_meets_the_head_timer(
    gw: tuple[GatewayProcess, Pki],
) -> None:
    gateway, pki = gw
    before = closed_count(gateway, pki, "header_timeout", "http")
    with socket.create_connection((gateway.host, gateway.http_port), timeout=5) as raw:
        tls = trusting(pki).wrap_socket(raw, server_hostname=gateway.host)
        try:
            assert closed_by_server(tls, within_s=10)  # type: ignore[arg-type]
        finally:
            tls.close()
    assert closed_count(gateway, pki, "header_timeout", "http") - before >= 1


def test_handshakes_count_against_the_cap_and_cannot_lock_clients_out(
    gw: tuple[GatewayProcess, Pki],
) -> None:
    """3x the cap in connections that never start their handshake: the oldest are closed to
    make room (counted as evicted), a client served before is served still, a new HTTPS or
    gRPC client is served."""
    gateway, pki = gw
    for protocol, port in ports(gateway):
        evicted = closed_count(gateway, pki, "evicted", protocol)
        with https(gateway, pki) as established:
            assert established.get("/v2/health/ready").status_code == 200
            idle = [
                socket.create_connection((gateway.host, port), timeout=5) for _ in range(3 * CAP)
            ]
            try:
                if protocol == "http":
                    with https(gateway, pki) as newcomer:
                        assert newcomer.get("/v2/health/ready").status_code == 200
                else:
                    with grpcs_client(gateway, pki.ca) as newcomer:
                        assert newcomer.is_server_live(client_timeout=10)
                assert established.get("/v2/health/ready").status_code == 200
            finally:
                for sock in idle:
                    sock.close()
        # Each connection past the cap closed one that waited (counted), or aborted one
        # closed before and still lingering (counted when it was closed).
        assert closed_count(gateway, pki, "evicted", protocol) - evicted >= CAP


def test_a_full_frontend_refuses_a_new_connection_at_once(
    gw: tuple[GatewayProcess, Pki],
) -> None:
    """Every slot held by a request in progress (a body still awaited): nothing may be closed
    to make room, so a new connection is closed before any TLS work, counted as limit."""
    gateway, pki = gw
    before = closed_count(gateway, pki, "limit", "http")
    timed_out = closed_count(gateway, pki, "header_timeout", "http")
    busy = []
    try:
        for _ in range(CAP):
            raw = socket.create_connection((gateway.host, gateway.http_port), timeout=5)
            conn = trusting(pki).wrap_socket(raw, server_hostname=gateway.host)
            busy.append(conn)
            conn.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: gw\r\n"
                b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"
            )
        time.sleep(0.2)  # the heads are read: every connection is in a request
        with socket.create_connection((gateway.host, gateway.http_port), timeout=5) as late:
            assert closed_by_server(late, within_s=3)
    finally:
        for conn in busy:
            conn.close()
    # Refused at once, not let in to time out (the scrapes after may be refused too, until
    # the gateway sees the busy clients go).
    assert closed_count(gateway, pki, "limit", "http") - before >= 1
    assert closed_count(gateway, pki, "header_timeout", "http") == timed_out


def test_clients_silent_after_their_handshake_cannot_lock_the_frontend(
    gw: tuple[GatewayProcess, Pki],
) -> None:
    """The cap filled with TLS connections that finish their handshake, then neither send nor
    read: each is closed to make room, and while it waits for a close_notify that never comes
    it is the first to go (aborted), so new clients keep being served."""
    gateway, pki = gw
    silent = []
    try:
        for _ in range(CAP):
            raw = socket.create_connection((gateway.host, gateway.http_port), timeout=5)
            silent.append(trusting(pki).wrap_socket(raw, server_hostname=gateway.host))
        for _ in range(3 * CAP):  # a new connection each, faster than the head timeout
            with https(gateway, pki) as client:
                assert client.get("/v2/health/ready").status_code == 200
    finally:
        for conn in silent:
            conn.close()


def test_a_stop_does_not_wait_for_idle_tls_clients(zoo_dir: Path, tmp_path: Path) -> None:
    """Idle keep-alive TLS clients that never close: a gateway told to stop closes them at once
    (no wait for their close_notify, up to a long head timeout) and exits 0 in about no time."""
    pki = mint(tmp_path / "certs")
    config = {
        "server": {
            "tls": {"cert_file": "certs/server.pem", "key_file": "certs/server.key"},
            "header_timeout_s": 20,
            "drain_timeout_s": 30,
        },
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    gateway = start_from_config(config, tmp_path)
    idle = []
    for _ in range(3):
        raw = socket.create_connection((gateway.host, gateway.http_port), timeout=5)
        conn = trusting(pki).wrap_socket(raw, server_hostname=gateway.host)
        conn.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: gw\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
        idle.append(conn)  # kept open, never read again
    try:
        started = time.monotonic()
        assert gateway.stop() == 0, gateway.log()
        assert time.monotonic() - started < 5
        assert "graceful shutdown exceeded" not in gateway.log()
    finally:
        for conn in idle:
            conn.close()
