"""A two-node Ray cluster on loopback for tests, in a process of its own (Ray stays out of
pytest's): a head node offering the `edge` resource and a worker node offering `cloud`.

Prints ``cluster ready: ADDRESS`` and then answers one JSON line per command line on stdin:
``placement APP DEPLOYMENT...`` gives each deployment's node resources (the deployment must have
a ``node`` method), ``nodes APP DEPLOYMENT CALLS`` the tiers of the nodes whichever replicas
answered CALLS calls ran on, ``hub APP`` the gateway replicas' hub state (leader, replicas and
their pids), ``apps`` the Serve applications, ``declare NAME IMPORT_PATH PORT ARGS_JSON`` deploys
an application by import path as KubeRay's RayService does; ``call APP DEPLOYMENT TIME_LEFT_S``
calls a member deployment with one digits row and that time left (``none``: no limit) and gives
its answer's shape or its error; EOF or SIGTERM shuts the cluster down.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import ray
from ray import serve
from ray.cluster_utils import Cluster

NODES = {
    "edge": {"num_cpus": 2, "resources": {"edge": 10}},
    "cloud": {"num_cpus": 2, "resources": {"cloud": 10}},
}


def declare(name: str, import_path: str, port: int, args: dict[str, str]) -> list[str]:
    """What a declarative deploy (KubeRay's `serveConfigV2`) does: Serve's proxy on ``port``,
    the application ``import_path`` built from ``args`` and run as ``name`` at `/`."""
    from ray.serve._private.utils import import_attr

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    builder = import_attr(import_path)
    serve.run(builder(args), name=name, route_prefix="/", blocking=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status.value == "RUNNING":
            break
        time.sleep(0.5)
    return sorted(serve.status().applications)


def call(app: str, deployment: str, time_left: str) -> dict[str, object]:
    import numpy as np

    left = None if time_left == "none" else float(time_left)
    feed = {"input": np.full((1, 64), 8.0, np.float32)}
    handle = serve.get_deployment_handle(deployment, app)
    try:
        out = handle.remote(feed, ["probabilities"], time_left_s=left).result(timeout_s=60)
    except Exception as exc:  # RayTaskError carries the replica's exception
        cause = getattr(exc, "cause", exc)
        return {"error": type(cause).__name__, "message": str(cause)}
    return {"shape": list(out["probabilities"].shape)}


def main() -> int:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            **NODES["edge"],
        },
    )
    try:
        cluster.add_node(node_ip_address="127.0.0.1", **NODES["cloud"])
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        print(f"cluster ready: {cluster.address}", flush=True)
        resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "placement":
                app, names = words[1], words[2:]
                nodes = {
                    name: serve.get_deployment_handle(name, app).node.remote().result(timeout_s=30)
                    for name in names
                }
                answer = {
                    name: sorted(k for k in resources[node] if k in NODES)
                    for name, node in nodes.items()
                }
            elif words[0] == "apps":
                answer = sorted(serve.status().applications)
            elif words[0] == "declare":  # deploy an application by its import path, with args
                answer = declare(words[1], words[2], int(words[3]), json.loads(words[4]))
            elif words[0] == "hub":  # the gateway replicas' hub actor: leader and replicas
                hub = ray.get_actor(f"{words[1]}-hub", namespace="ensemble")
                answer = ray.get(hub.state.remote(), timeout=30)
            elif words[0] == "call":  # a member deployment called as the gateway calls it
                answer = call(words[1], words[2], words[3])
            elif words[0] == "nodes":  # the node resources of whichever replica answers
                app, name, calls = words[1], words[2], int(words[3])
                handle = serve.get_deployment_handle(name, app)
                seen = {handle.node.remote().result(timeout_s=30) for _ in range(calls)}
                answer = sorted(sorted(k for k in resources[n] if k in NODES)[0] for n in seen)
            else:
                answer = {"error": f"unknown command {words[0]!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
