"""The benchmark ensemble as a Ray Serve app: an ingress fanning out to member deployments."""

# Built the way Ray Serve's model-composition guide builds an ensemble: one deployment per member
# (an onnxruntime session with the gateway's own session options) and an ingress that decodes the
# same OIP request bytes, calls every member through its DeploymentHandle concurrently, averages
# the class probabilities (mean_probability) and answers the same OIP JSON. Run as
# `python -m loadtest.peers.ray_app CONFIG --port P`: starts Ray on loopback without the
# dashboard, prints `ray serve ready: http=H:P`, and on SIGTERM runs serve.shutdown() and
# ray.shutdown() and exits 0.

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

import numpy as np

# Before Ray is imported: its servers bind to loopback only (ensemble.control.ray_runtime explains).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ensemble.config import load_config
from ensemble.errors import EnsembleError
from ensemble.models.card import load_card
from ensemble.oip.rest import (
    HEADER_LENGTH,
    decode_infer_request,
    dumps,
    encode_infer_response,
)
from ensemble.replicas.onnx import load_session
from ensemble.types import InferRequest, InferResponse, Tensor

# Tuned so the comparison is fair to Ray (REFERENCES.md: the default max_ongoing_requests=5 chokes
# a single replica at ~27 req/s; 64 gave 155-180 req/s). 64 is the most requests the benchmark
# ever has in flight (64 connections; the open-loop client caps its pool at 64), so no request
# waits in Ray's router for a replica slot, and a larger cap could change nothing.
MAX_ONGOING_REQUESTS = 64
# One replica per deployment: four replicas share the two cores, as the gateway's members share
# its process; more replicas would only add processes competing for the same two cores.
NUM_CPUS_PER_REPLICA = 0.5
# As the gateway runs (access_log=False): per-request log lines are not what is being compared.
_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


async def read_infer_request(request: Request, model_name: str) -> InferRequest | Response:
    """The OIP request in ``request``'s body (JSON or binary tensors), or the 400 to answer."""
    body = await request.body()
    try:
        return decode_infer_request(body, request.headers.get(HEADER_LENGTH), model_name, None)
    except EnsembleError as exc:
        return Response(dumps({"error": exc.message}), exc.http_status)


def oip_response(response: InferResponse, infer: InferRequest) -> Response:
    """``response`` encoded as ``infer`` asked (JSON, or binary tensors with their header)."""
    payload, header_length = encode_infer_response(response, infer)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": NUM_CPUS_PER_REPLICA},
    logging_config=_LOGGING,
)
class OnnxMember:
    """One ensemble member: an onnxruntime session returning class probabilities."""

    def __init__(self, model_path: str, probability_output: str) -> None:
        self.session = load_session(Path(model_path))
        self.input_name = self.session.get_inputs()[0].name
        self.output = probability_output

    def __call__(self, x: np.ndarray) -> np.ndarray:
        scores: np.ndarray = self.session.run([self.output], {self.input_name: x})[0]
        return scores


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": NUM_CPUS_PER_REPLICA},
    logging_config=_LOGGING,
)
class EnsembleIngress:
    """OIP REST infer endpoint: decode, fan out to every member by handle, average, encode."""

    def __init__(
        self, model_name: str, member_names: list[str], members: list[DeploymentHandle[Any]]
    ) -> None:
        self.model_name = model_name
        self.member_names = ",".join(member_names)
        self.members = members

    async def __call__(self, request: Request) -> Response:
        infer = await read_infer_request(request, self.model_name)
        if isinstance(infer, Response):
            return infer
        x = infer.inputs[0].data
        answers = await asyncio.gather(*(member.remote(x) for member in self.members))
        probabilities = np.mean(np.stack(answers), axis=0).astype(np.float32)
        labels = probabilities.argmax(axis=1).astype(np.int64)
        response = InferResponse(
            self.model_name,
            "1",
            [
                Tensor("label", "INT64", labels.shape, labels),
                Tensor("probabilities", "FP32", probabilities.shape, probabilities),
            ],
            parameters={"policy": "mean_probability", "members_answered": self.member_names},
        )
        return oip_response(response, infer)


def build_app(config_path: Path) -> tuple[Any, str]:
    """The Serve application for the config's first ensemble, and that ensemble's name."""
    cfg = load_config(config_path)
    ensemble = cfg.ensembles[0]
    members = []
    for member in ensemble.members:
        model = cfg.resolve(member.model)
        card_path = cfg.resolve(member.card) if member.card else model.with_suffix(".card.json")
        output = member.probability_output or load_card(card_path).probability_output
        member_app = OnnxMember.options(name=member.name)  # type: ignore[attr-defined]
        members.append(member_app.bind(str(model), output))
    names = [m.name for m in ensemble.members]
    ingress = EnsembleIngress.bind(ensemble.name, names, members)  # type: ignore[attr-defined]
    return ingress, ensemble.name


def warm_up(url: str, timeout_s: float = 60.0) -> None:
    """Answer a few requests through Serve's HTTP proxy before saying ready: serve.run returns
    when the deployments run, while the proxy and the handles' first calls still take seconds
    on 2 cores, which a short measurement would count against Ray."""
    import httpx

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    deadline = time.monotonic() + timeout_s
    answered = 0
    with httpx.Client(timeout=10, trust_env=False) as client:
        while answered < 5 and time.monotonic() < deadline:
            try:
                answered += client.post(url, json=body).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.peers.ray_app", description=__doc__)
    parser.add_argument("config", type=Path, help="gateway config whose first ensemble to serve")
    parser.add_argument("--port", type=int, required=True, help="Serve HTTP proxy port")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    app, name = build_app(args.config)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    # ray.init installs a SIGTERM handler that exits at once; shut Serve down cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=_LOGGING)
        serve.run(app, name=name, route_prefix=f"/v2/models/{name}", logging_config=_LOGGING)
        warm_up(f"http://127.0.0.1:{args.port}/v2/models/{name}/infer")
        print(f"ray serve ready: http=127.0.0.1:{args.port} app={name}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    # Re-import under the module's real name: Ray pickles the deployment classes by reference,
    # and workers can import `loadtest.peers.ray_app` but not this process's `__main__`.
    from loadtest.peers.ray_app import main as _main

    sys.exit(_main())
