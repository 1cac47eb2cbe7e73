"""Keep the Ray the gateway starts on loopback: the environment its processes inherit.

With 127.0.0.1 as the node's address, Ray 2.60 binds its own servers (GCS, raylet and object
manager, every worker's gRPC server, the dashboard and runtime-env agents, the metrics
exporter) to loopback. Ray Serve's replicas are the exception: each opens an inter-deployment
gRPC server on ``[::]:0`` (every interface) whatever the node's address, with no setting to
move it. A worker setup hook, run by Ray in each worker process before any actor starts, binds
such wildcard addresses to the node's address instead.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable
from typing import Any

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 before Ray is imported, Ray takes 127.0.0.1 as this node's address: its servers
bind to loopback only and a loopback bootstrap address stays loopback. Otherwise Ray 2.60 binds
its gRPC servers to every interface and rewrites 127.0.0.1 to the host's outside address, even
when given ``_node_ip_address="127.0.0.1"``."""

SERVE_INGRESS_OFF = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
"""Serve's per-replica HTTP/gRPC ingress, and HAProxy (which turns it on and binds every
interface by design): the gateway is the ingress and calls its members by handle, so its
private Ray never needs them, whatever the environment says (``RAY_SERVE_THROUGHPUT_OPTIMIZED``
turns direct ingress on)."""

SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
"""Where a Ray worker finds its setup hook (a module path) at startup. ``ray.init(runtime_env=
{"worker_process_setup_hook": ...})`` sets the same variable, but through a job runtime
environment, which the workers Ray starts ahead of the job cannot serve: each start left an
idle worker (about 80 MB) behind and took longer. Set in the environment, every worker inherits
it from the raylet."""

SETUP_HOOK = f"{__name__}.bind_wildcards_to_node_ip"


def loopback_environment() -> None:
    """Prepare this process's environment, which Ray's processes inherit, before Ray starts."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    os.environ.update(SERVE_INGRESS_OFF)
    os.environ[SETUP_HOOK_ENV] = SETUP_HOOK


def unspecified_to(address: str, host: str) -> str:
    """``[::]:0`` or ``0.0.0.0:0`` -> ``HOST:0``; any other address is returned as it is."""
    bind_host, sep, port = address.rpartition(":")
    if not sep:
        return address
    try:
        unspecified = ipaddress.ip_address(bind_host.strip("[]")).is_unspecified
    except ValueError:  # a host name
        return address
    if not unspecified:
        return address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_wildcards_to_node_ip() -> None:
    """Ray worker setup hook: a gRPC server Ray's Python code opens in this worker on every
    interface (Serve's inter-deployment server, ``[::]:0``) listens on the node's address.

    Ray binds through ``ray._common.tls_utils.add_port_to_grpc_server`` (which also honours
    ``RAY_USE_TLS``); modules import it by name, so the function and the names already
    imported are replaced. Serve's replica module is imported after this hook, when a replica
    actor's class is loaded, and takes the replacement.
    """
    import ray.util
    from ray._common import tls_utils

    tls: Any = tls_utils
    node_ip: Callable[[], str] = ray.util.get_node_ip_address
    original: Callable[[Any, str], int] = tls.add_port_to_grpc_server
    if getattr(original, "binds_node_ip", False):
        return

    def add_port_to_grpc_server(server: Any, address: str) -> int:
        return original(server, unspecified_to(address, node_ip()))

    add_port_to_grpc_server.binds_node_ip = True  # type: ignore[attr-defined]
    for module in [tls, *sys.modules.values()]:
        if getattr(module, "add_port_to_grpc_server", None) is original:
            replaced: Any = module
            replaced.add_port_to_grpc_server = add_port_to_grpc_server
