"""Loopback means loopback: every socket a gateway's process tree listens on, its private Ray's
included (GCS, raylet, agents, Serve's controller and replicas), is on a loopback address."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.integration.conftest import array_input
from tests.integration.process import start_from_config, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket or a bound, unconnected UDP socket, and its process."""

    protocol: str
    ip: str
    port: int
    pid: int
    process: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.protocol} {host}:{self.port} ({self.process}, pid {self.pid})"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (``::ffff:127.0.0.1``, a dual-stack
    socket bound to 127.0.0.1, as gRPC binds)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def listeners(pid: int) -> list[Listener]:
    """What the process ``pid`` and all its descendants listen on."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited meanwhile listens on nothing
        for conn in conns:
            tcp = conn.type == socket.SOCK_STREAM
            if (tcp and conn.status != psutil.CONN_LISTEN) or (not tcp and conn.raddr):
                continue
            found.append(
                Listener("tcp" if tcp else "udp", conn.laddr.ip, conn.laddr.port, proc.pid, name)
            )
    return found


def test_is_loopback_counts_mapped_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not any(map(is_loopback, ["0.0.0.0", "::", "::ffff:0.0.0.0", "192.0.2.2"]))


def test_gateway_and_its_ray_listen_on_loopback_only(zoo_dir: Path, tmp_path: Path) -> None:
    config = {
        "tiers": {"edge": {}, "cloud": {}},
        "ensembles": [
            {
                "name": "pair",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("forest", {"tier": "cloud", "backend": "ray"}),
                ],
            }
        ],
    }
    gw = start_from_config(config, tmp_path, env={"RAY_AUTH_MODE": "disabled"})
    try:
        # One call through Ray first, so anything opened on the request path shows too.
        x = np.zeros((1, 64), np.float32)
        answer = httpx.post(
            f"{gw.http_url}/v2/models/forest/infer", json={"inputs": [array_input(x)]}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        found = listeners(gw.proc.pid)
    finally:
        code = gw.stop(timeout_s=60)
    assert code == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()

    # The walk saw Ray's processes, not only the gateway's own.
    names = {listener.process for listener in found}
    for part in ("gcs_server", "raylet", "ServeController", "ServeReplica:ensemble:forest"):
        assert any(part in name for name in names), f"no listener of {part}: {names}"
    offenders = [str(listener) for listener in found if not is_loopback(listener.ip)]
    assert not offenders, "listening beyond loopback:\n" + "\n".join(sorted(offenders))
