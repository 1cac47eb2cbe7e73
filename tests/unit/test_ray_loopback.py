"""The private Ray's loopback settings without Ray: wildcard bind addresses moved to the node's
address, the environment Ray's processes inherit. tests/integration/test_ray_loopback.py checks
a real gateway's sockets."""

from __future__ import annotations

import os

import pytest

from ensemble.replicas.ray_loopback import (
    LOOPBACK_ENV,
    SETUP_HOOK,
    SETUP_HOOK_ENV,
    bind_wildcards_to_node_ip,
    loopback_environment,
    unspecified_to,
)


@pytest.mark.parametrize(
    ("address", "host", "expected"),
    [
        ("[::]:0", "127.0.0.1", "127.0.0.1:0"),
        ("0.0.0.0:9000", "127.0.0.1", "127.0.0.1:9000"),
        ("[::]:0", "::1", "[::1]:0"),
        ("[::]:0", "10.0.0.5", "10.0.0.5:0"),
        ("127.0.0.1:0", "10.0.0.5", "127.0.0.1:0"),
        ("[::1]:50051", "10.0.0.5", "[::1]:50051"),
        ("10.0.0.7:0", "10.0.0.5", "10.0.0.7:0"),
        ("localhost:0", "10.0.0.5", "localhost:0"),
        ("unix:/tmp/socket", "10.0.0.5", "unix:/tmp/socket"),
    ],
)
def test_only_wildcard_addresses_move_to_the_node(address: str, host: str, expected: str) -> None:
    assert unspecified_to(address, host) == expected


def test_environment_names_an_importable_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (LOOPBACK_ENV, SETUP_HOOK_ENV, "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    loopback_environment()
    assert os.environ[LOOPBACK_ENV] == "0"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    module, _, function = os.environ[SETUP_HOOK_ENV].rpartition(".")
    assert os.environ[SETUP_HOOK_ENV] == SETUP_HOOK
    assert getattr(__import__(module, fromlist=[function]), function) is bind_wildcards_to_node_ip
