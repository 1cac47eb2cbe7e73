"""ENSEMBLE_API_KEYS through a real gateway, with tritonclient over HTTP and gRPC: inference,
metadata, model config and the repository index need a key (401 / UNAUTHENTICATED without one
or with a wrong one, before the body is read); health, probes, server metadata and /metrics
stay open; the feedback route is not theirs to guard."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
KEYS = " key-one , key-two ,"  # whitespace and an empty entry, as an operator might write it
X = np.zeros((1, 64), np.float32)
CHALLENGE = 'Bearer realm="ensemble"'


@pytest.fixture(scope="module", params=["grpcio", "uvicorn"])
def gw(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    """A gateway needing API keys, its gRPC served by each stack."""
    tmp = tmp_path_factory.mktemp("api-keys")
    config = {
        "server": {"grpc_stack": request.param},
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    proc = start_from_config(config, tmp, env={"ENSEMBLE_API_KEYS": KEYS})
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def http(gw: GatewayProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(gw.http_target, network_timeout=10)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(gw: GatewayProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(gw.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def raw(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.http_url, timeout=10) as client:
        yield client


def http_infer(
    client: httpclient.InferenceServerClient, headers: dict[str, str] | None
) -> np.ndarray:
    inp = httpclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    # A copy: tritonclient.http adds its Inference-Header-Content-Length to the dict it is given.
    given = None if headers is None else dict(headers)
    label: np.ndarray = client.infer("digits", [inp], headers=given).as_numpy("label")
    return label


def grpc_infer(
    client: grpcclient.InferenceServerClient, headers: dict[str, str] | None
) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    if headers is not None:  # gRPC metadata keys are lower case (grpcio refuses others)
        headers = {k.lower(): v for k, v in headers.items()}
    result = client.infer("digits", [inp], headers=headers, client_timeout=10)
    label: np.ndarray = result.as_numpy("label")
    return label


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer nope"}])
def test_inference_without_a_good_key_is_refused(
    http: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    headers: dict[str, str] | None,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        http_infer(http, headers)
    assert info.value.status() == "401"
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(grpc_client, headers)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


@pytest.mark.parametrize("key", ["key-one", "key-two"])
def test_inference_with_a_key_answers(
    http: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
    key: str,
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    assert http_infer(http, headers).shape == (1,)
    assert grpc_infer(grpc_client, headers).shape == (1,)
    assert http.get_model_metadata("digits", headers=headers)["name"] == "digits"
    metadata = {"authorization": f"Bearer {key}"}
    assert grpc_client.get_model_metadata("digits", headers=metadata).name == "digits"


def test_http_refusal_is_an_oip_error_with_a_bearer_challenge(raw: httpx.Client) -> None:
    guarded = [
        ("GET", "/v2/models/digits"),
        ("GET", "/v2/models/digits/versions/1"),
        ("GET", "/v2/models/digits/config"),
        ("GET", "/v2/models/logreg"),
        ("GET", "/v2/models/unknown"),  # no 404: a client without a key learns no model names
        ("POST", "/v2/models/digits/infer"),
        ("POST", "/v2/repository/index"),
    ]
    for method, path in guarded:
        for headers in ({}, {"Authorization": "Bearer key-three"}, {"Authorization": "key-one"}):
            response = raw.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == CHALLENGE
            assert response.json()["error"]
    ok = raw.get("/v2/models/digits/config", headers={"Authorization": "bearer key-two"})
    assert ok.status_code == 200


def test_health_probes_server_metadata_and_metrics_stay_open(
    raw: httpx.Client, grpc_client: grpcclient.InferenceServerClient
) -> None:
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/digits/ready",
        "/v2/models/digits/versions/1/ready",
        "/metrics",
    ):
        assert raw.get(path).status_code == 200, path
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("digits")
    assert grpc_client.get_server_metadata().name == "ensemble-gateway"


def test_the_feedback_route_is_not_guarded_by_api_keys(raw: httpx.Client) -> None:
    response = raw.post("/v2/models/digits/feedback", json={})
    assert response.headers.get("www-authenticate") != CHALLENGE


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_metadata("digits"),
        lambda c: c.get_model_config("digits"),
        lambda c: c.get_model_repository_index(),
    ],
    ids=["ModelMetadata", "ModelConfig", "RepositoryIndex"],
)
def test_grpc_metadata_rpcs_need_a_key(
    grpc_client: grpcclient.InferenceServerClient,
    call: Callable[[grpcclient.InferenceServerClient], Any],
) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(grpc_client)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


def test_refused_before_the_body_is_read(gw: GatewayProcess) -> None:
    """A head announcing a large body and no body at all: the 401 comes at once."""
    head = (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    with socket.create_connection((gw.host, gw.http_port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer


def test_process_replicas_are_called_without_a_key(zoo_dir: Path, tmp_path: Path) -> None:
    """The gateway's `ensemble replica` children do not inherit its keys: it calls them on
    loopback without one."""
    member = zoo_member("logreg", {"tier": "edge", "backend": "process"})
    config = {"ensembles": [{"name": "digits", "members": [member]}]}
    gw = start_from_config(config, tmp_path, env={"ENSEMBLE_API_KEYS": KEYS})
    try:
        client = httpclient.InferenceServerClient(gw.http_target, network_timeout=30)
        try:
            assert http_infer(client, {"Authorization": "Bearer key-one"}).shape == (1,)
        finally:
            client.close()
    finally:
        assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()
