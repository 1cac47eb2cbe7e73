"""The gateway's calls to a remote `ensemble replica` that wants mutual TLS and an API key,
through real processes: with the placement's `tls` (a CA, a client certificate, paths beside
the config) and `api_key_env`, oip-http (https://) and oip-grpc (TLS) members answer; without
the client certificate the replica refuses the connections (the members are unready); with a
wrong key it refuses the calls, and the gateway's error says so."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.process import ZOO, GatewayProcess, start_gateway, start_replica
from tests.integration.test_tls import Pki, mint

pytestmark = pytest.mark.integration
KEY = "replica-key-for-tests"
ROW = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8.0] * 64}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Pki]]:
    tmp = tmp_path_factory.mktemp("guarded-replica")
    pki = mint(tmp / "certs")
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = start_replica(
        ZOO / "logreg.onnx",
        tmp / "replica.log",
        *tls,
        "--tls-client-ca",
        str(pki.ca),
        env={"ENSEMBLE_API_KEYS": KEY},
    )
    yield server, pki
    assert server.stop() == 0, server.log()


def _gateway(
    tmp: Path, replica: GatewayProcess, pki: Pki, *, client_cert: bool, key: str
) -> GatewayProcess:
    """A gateway whose members `via_http` and `via_grpc` are the replica's logreg; its TLS files
    copied beside its config and named relative to it."""
    for source in (pki.ca, pki.client_cert, pki.client_key):
        shutil.copy(source, tmp / source.name)
    tls: dict[str, Any] = {"ca_file": pki.ca.name}
    if client_cert:
        tls.update(cert_file=pki.client_cert.name, key_file=pki.client_key.name)
    common = {"tier": "cloud", "remote_model": "logreg", "tls": tls, "api_key_env": "LOGREG_KEY"}
    endpoint = f"127.0.0.1:{replica.http_port}"
    members = [
        {
            "name": "via_http",
            "model": str(ZOO / "logreg.onnx"),
            "placement": [{**common, "backend": "oip-http", "endpoints": [f"https://{endpoint}"]}],
        },
        {
            "name": "via_grpc",
            "model": str(ZOO / "logreg.onnx"),
            "placement": [{**common, "backend": "oip-grpc", "endpoints": [replica.grpc_target]}],
        },
    ]
    doc = {
        "model_zoo": {"dir": str(ZOO)},
        "tiers": {"cloud": {}},
        "ensembles": [{"name": "remote", "members": members}],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return start_gateway(path, tmp / "gw.log", env={"LOGREG_KEY": key})


def _ask(gw: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(f"{gw.http_url}/v2/models/{model}/infer", json={"inputs": [ROW]}, timeout=30)


def test_members_on_a_guarded_replica_answer_over_https_and_grpc_tls(
    replica: tuple[GatewayProcess, Pki], tmp_path: Path
) -> None:
    server, pki = replica
    gw = _gateway(tmp_path, server, pki, client_cert=True, key=KEY)
    try:
        for member in ("via_http", "via_grpc"):
            answer = _ask(gw, member)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["outputs"][1]["data"]) == 10  # probabilities
        both = _ask(gw, "remote")
        assert both.status_code == 200, both.text
        answered = both.json()["parameters"]["members_answered"]
        assert set(answered.split(",")) == {"via_http@cloud", "via_grpc@cloud"}
    finally:
        assert gw.stop() == 0, gw.log()


def test_without_the_client_certificate_the_members_are_unready(
    replica: tuple[GatewayProcess, Pki], tmp_path: Path
) -> None:
    server, pki = replica
    gw = _gateway(tmp_path, server, pki, client_cert=False, key=KEY)
    try:
        for member in ("via_http", "via_grpc"):  # the handshake fails: so do health checks
            assert _ask(gw, member).status_code == 503
            assert httpx.get(f"{gw.http_url}/v2/models/{member}/ready").status_code != 200
    finally:
        assert gw.stop() == 0, gw.log()


def test_a_wrong_key_is_refused_by_the_replica_and_said_so(
    replica: tuple[GatewayProcess, Pki], tmp_path: Path
) -> None:
    server, pki = replica
    gw = _gateway(tmp_path, server, pki, client_cert=True, key="a-wrong-key")
    try:
        for member, code in (("via_http", "401"), ("via_grpc", "UNAUTHENTICATED")):
            # Readiness needs no key (probes are open), so the call goes and is refused.
            answer = _ask(gw, member)
            assert answer.status_code == 502, answer.text
            assert code in answer.json()["error"] and "API key" in answer.json()["error"]
    finally:
        assert gw.stop() == 0, gw.log()
