"""One autoscaled Ray Serve deployment on an emulated device, recording its replica count."""

# The Ray Serve side of `python -m loadtest.autoscale`: the config's first member (logreg in
# loadtest/configs/autoscale.yaml) as ONE deployment that is also the HTTP ingress, answering
# the same OIP JSON/binary requests as the gateway, so the same scenario runs against both. Each
# replica is the same emulated device as the gateway's `device: {service_ms, concurrency: 1}`:
# max_ongoing_requests=1 and every call held at least service_ms. Serve's own autoscaler sizes
# it (autoscaling_config below; everything not set there is Ray's default). A thread polls
# serve.status() every 0.5 s and appends `wall_time,running,total` to --replicas-csv. Run as
# `python -m loadtest.peers.ray_autoscale_app CONFIG --port P --replicas-csv FILE [--tuned]`:
# starts Ray on loopback without the dashboard, prints `ray serve ready: http=H:P`, and on
# SIGTERM runs serve.shutdown() and ray.shutdown() and exits 0.

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Before Ray is imported: its servers bind to loopback only (ensemble.control.ray_runtime explains).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from ensemble.config import load_config
from ensemble.models.card import load_card
from ensemble.oip.rest import (
    dumps,
)
from ensemble.replicas.onnx import load_session
from ensemble.types import InferResponse, Tensor
from loadtest.peers.ray_app import oip_response, read_infer_request, warm_up

# Serve's default. With 1 (the device's concurrency) Serve's router collapsed here: replicas
# rejected calls "at capacity of max_ongoing_requests=1", the proxy's queue-length probes timed
# out, and one 20 req/s replica answered 1-8 req/s. So, like the gateway's DeviceReplica, a
# replica takes up to 5 calls and its device serves them one at a time, FIFO (an
# asyncio.Semaphore(1)); ongoing requests (what target_ongoing_requests counts) include those
# waiting, as the gateway's calls in flight do.
MAX_ONGOING_REQUESTS = 5
# Nine replicas must fit the two CPUs Ray sees here; a replica mostly sleeps (the device).
NUM_CPUS_PER_REPLICA = 0.1
_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
DEPLOYMENT = "device"
TUNED_DELAYS_S = {"upscale_delay_s": 1.0, "downscale_delay_s": 10.0}
"""The tuned variant: Serve's delays near the gateway's (defaults: 30 s up, 600 s down)."""


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": NUM_CPUS_PER_REPLICA},
    logging_config=_LOGGING,
)
class DeviceMember:
    """OIP REST infer on one onnxruntime session on a device serving one call at a time, each
    holding it >= service_ms (calls beyond wait in FIFO order)."""

    def __init__(self, model_name: str, model_path: str, output: str, service_ms: float) -> None:
        self.model_name = model_name
        self.session = load_session(Path(model_path))
        self.input_name = self.session.get_inputs()[0].name
        self.output = output
        self.service_s = service_ms / 1000
        self.device = asyncio.Semaphore(1)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET":  # the harness's readiness check, GET .../ready
            return Response(dumps({"name": self.model_name, "ready": True}))
        infer = await read_infer_request(request, self.model_name)
        if isinstance(infer, Response):
            return infer
        x = infer.inputs[0].data
        async with self.device:
            started = time.monotonic()
            probabilities = self.session.run([self.output], {self.input_name: x})[0]
            await asyncio.sleep(self.service_s - (time.monotonic() - started))
        labels = probabilities.argmax(axis=1)
        response = InferResponse(
            self.model_name,
            "1",
            [
                Tensor("label", "INT64", labels.shape, labels.astype("int64")),
                Tensor("probabilities", "FP32", probabilities.shape, probabilities),
            ],
        )
        return oip_response(response, infer)


def autoscaling_config(min_replicas: int, max_replicas: int, tuned: bool) -> dict[str, Any]:
    """Serve's autoscaling config: target one call in flight per replica, else Ray's defaults."""
    config: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 1,
    }
    return config | TUNED_DELAYS_S if tuned else config


def build_app(config_path: Path, autoscaling: dict[str, Any]) -> tuple[Any, str, float]:
    """The app for the config's first ensemble's first member, the ensemble's name, and the
    member's device service time (ms)."""
    cfg = load_config(config_path)
    ensemble = cfg.ensembles[0]
    member = ensemble.members[0]
    device = next((p.device for p in member.placement if p.device is not None), None)
    if device is None:
        raise SystemExit(f"{config_path}: {member.name} has no `device` placement to emulate")
    model = cfg.resolve(member.model)
    card_path = cfg.resolve(member.card) if member.card else model.with_suffix(".card.json")
    output = member.probability_output or load_card(card_path).probability_output
    app = DeviceMember.options(autoscaling_config=autoscaling).bind(  # type: ignore[attr-defined]
        ensemble.name, str(model), output, device.service_ms
    )
    return app, ensemble.name, device.service_ms


def record_replicas(app: str, path: Path, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Append `wall_time,running,total` every interval (total counts starting replicas too)."""
    with path.open("w") as out:
        out.write("wall_time,running,total\n")
        while not stop.wait(interval_s):
            try:
                status = serve.status()
                states = status.applications[app].deployments[DEPLOYMENT].replica_states
            except Exception:
                continue
            counts = {str(getattr(s, "value", s)): int(n) for s, n in states.items()}
            running = counts.get("RUNNING", 0)
            total = running + counts.get("STARTING", 0)
            out.write(f"{time.time():.3f},{running},{total}\n")
            out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.peers.ray_autoscale_app", description=__doc__
    )
    parser.add_argument("config", type=Path, help="gateway config whose first member to serve")
    parser.add_argument("--port", type=int, required=True, help="Serve HTTP proxy port")
    parser.add_argument("--replicas-csv", type=Path, required=True, help="replica count log")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=9)
    parser.add_argument(
        "--tuned", action="store_true", help="upscale_delay_s 1, downscale_delay_s 10"
    )
    args = parser.parse_args(argv)
    import ray

    autoscaling = autoscaling_config(args.min_replicas, args.max_replicas, args.tuned)
    app, name, _ = build_app(args.config, autoscaling)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    # ray.init installs a SIGTERM handler that exits at once; shut Serve down cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    recorder: threading.Thread | None = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=_LOGGING)
        serve.run(app, name=name, route_prefix=f"/v2/models/{name}", logging_config=_LOGGING)
        warm_up(f"http://127.0.0.1:{args.port}/v2/models/{name}/infer")
        recorder = threading.Thread(
            target=record_replicas, args=(name, args.replicas_csv, stop), daemon=True
        )
        recorder.start()
        print(f"ray serve ready: http=127.0.0.1:{args.port} app={name}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        if recorder is not None:
            recorder.join(timeout=5)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    # Re-import under the module's real name: Ray pickles the deployment class by reference,
    # and workers can import `loadtest.peers.ray_autoscale_app` but not this `__main__`.
    from loadtest.peers.ray_autoscale_app import main as _main

    sys.exit(_main())
