"""TLS on both frontends through real processes and tritonclient: a gateway from a config
(relative certificate paths) serves HTTPS and gRPC over TLS and refuses plain text; an
`ensemble replica` with a client CA (mutual TLS) refuses clients without a certificate, or
with one its CA did not sign, and serves those with one."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import gevent.ssl
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from tritonclient.utils import InferenceServerException

from tests.integration.process import (
    ZOO,
    GatewayProcess,
    start_from_config,
    start_gateway,
    start_replica,
    zoo_member,
)

pytestmark = pytest.mark.integration
X = np.zeros((1, 64), np.float32)
REFUSED = (HTTPException, OSError)
"""What tritonclient.http raises when the server ends the connection during or right after
the handshake (geventhttpclient's HTTPConnectionClosed, or an SSL error or reset by timing)."""


@dataclass
class Pki:
    """A CA, the gateway's certificate and a client's, as PEM files in ``dir``."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def mint(directory: Path, name: str = "ca") -> Pki:
    """A fresh CA with a server certificate for 127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.test")
    pki = Pki(
        directory,
        directory / f"{name}.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
    ca.cert_pem.write_to_path(str(pki.ca))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.private_key_pem.write_to_path(str(pki.client_key))
    for leaf, path in ((server, pki.server_cert), (client, pki.client_cert)):
        path.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    return pki


def https_client(
    gw: GatewayProcess, ca: Path, cert: tuple[Path, Path] | None = None
) -> httpclient.InferenceServerClient:
    options: dict[str, Any] = {"ca_certs": str(ca)}
    if cert is not None:
        options.update(certfile=str(cert[0]), keyfile=str(cert[1]))
    return httpclient.InferenceServerClient(
        gw.http_target,
        ssl=True,
        ssl_options=options,
        ssl_context_factory=gevent.ssl.create_default_context,
        connection_timeout=10,
        network_timeout=10,
    )


def grpcs_client(
    gw: GatewayProcess, ca: Path, cert: tuple[Path, Path] | None = None
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        gw.grpc_target,
        ssl=True,
        root_certificates=str(ca),
        private_key=None if cert is None else str(cert[1]),
        certificate_chain=None if cert is None else str(cert[0]),
    )


def infer_http(client: httpclient.InferenceServerClient, model: str) -> np.ndarray:
    inp = httpclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    label: np.ndarray = client.infer(model, [inp]).as_numpy("label")
    return label


def infer_grpc(client: grpcclient.InferenceServerClient, model: str) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    label: np.ndarray = client.infer(model, [inp], client_timeout=10).as_numpy("label")
    return label


@pytest.fixture(scope="module")
def tls_gateway(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Pki]]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = mint(tmp / "certs")
    config = {
        "server": {"tls": {"cert_file": "certs/server.pem", "key_file": "certs/server.key"}},
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    gw = start_from_config(config, tmp)  # the paths are relative to tmp/gateway.yaml
    yield gw, pki
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


@pytest.fixture(scope="module")
def mtls_replica(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Pki]]:
    tmp = tmp_path_factory.mktemp("mtls")
    pki = mint(tmp)
    flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    gw = start_replica(
        ZOO / "logreg.onnx", tmp / "replica.log", *flags, "--tls-client-ca", str(pki.ca)
    )
    yield gw, pki
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def test_https_and_grpc_over_tls_answer(tls_gateway: tuple[GatewayProcess, Pki]) -> None:
    gw, pki = tls_gateway
    http = https_client(gw, pki.ca)
    try:
        assert http.is_server_ready()
        assert infer_http(http, "digits").shape == (1,)
    finally:
        http.close()
    grpcs = grpcs_client(gw, pki.ca)
    try:
        assert grpcs.is_server_ready()
        assert infer_grpc(grpcs, "digits").shape == (1,)
    finally:
        grpcs.close()


def test_plain_text_clients_fail(tls_gateway: tuple[GatewayProcess, Pki]) -> None:
    gw, _ = tls_gateway
    http = httpclient.InferenceServerClient(gw.http_target, network_timeout=10)
    try:
        with pytest.raises(REFUSED):
            http.is_server_live()
    finally:
        http.close()
    plain = grpcclient.InferenceServerClient(gw.grpc_target)
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_live(client_timeout=10)
    finally:
        plain.close()


def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_gateway: tuple[GatewayProcess, Pki], tmp_path: Path
) -> None:
    gw, _ = tls_gateway
    stranger = mint(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        context = ssl.create_default_context(cafile=str(stranger.ca))
        with socket.create_connection((gw.host, gw.http_port), timeout=10) as sock:
            context.wrap_socket(sock, server_hostname=gw.host).close()


def test_mutual_tls_needs_a_client_certificate_signed_by_the_ca(
    mtls_replica: tuple[GatewayProcess, Pki], tmp_path: Path
) -> None:
    gw, pki = mtls_replica
    good = (pki.client_cert, pki.client_key)
    http = https_client(gw, pki.ca, good)
    grpcs = grpcs_client(gw, pki.ca, good)
    try:
        assert infer_http(http, "logreg").shape == (1,)
        assert infer_grpc(grpcs, "logreg").shape == (1,)
    finally:
        http.close()
        grpcs.close()

    stranger = mint(tmp_path / "stranger")  # a certificate from a CA the replica does not know
    for cert in (None, (stranger.client_cert, stranger.client_key)):
        http = https_client(gw, pki.ca, cert)
        try:
            with pytest.raises(REFUSED):
                http.is_server_live()
        finally:
            http.close()
        grpcs = grpcs_client(gw, pki.ca, cert)
        try:
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                grpcs.is_server_live(client_timeout=10)
        finally:
            grpcs.close()


@pytest.mark.parametrize("stack", ["grpcio", "uvicorn"])
def test_workers_serve_https_and_grpcs_with_the_configs_files(
    zoo_dir: Path, tmp_path: Path, stack: str
) -> None:
    """`--workers 2`: each worker loads the config's TLS files; both ports speak TLS only,
    whichever stack serves gRPC (uvicorn's offers HTTP/2 by ALPN, and shares the port)."""
    import yaml

    pki = mint(tmp_path / "certs")
    tls = {"cert_file": "certs/server.pem", "key_file": "certs/server.key"}
    config = {
        "model_zoo": {"dir": str(ZOO)},
        "server": {"tls": tls, "grpc_stack": stack},
        "ensembles": [{"name": "digits", "members": [zoo_member("logreg")]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = start_gateway(path, tmp_path / "gw.log", "--workers", "2")
    try:
        for _ in range(4):  # new connections: either worker
            with https_client(gw, pki.ca) as client:
                assert infer_http(client, "digits").shape == (1,)
            with grpcs_client(gw, pki.ca) as client:
                assert infer_grpc(client, "digits").shape == (1,)
        plain = httpclient.InferenceServerClient(gw.http_target, network_timeout=5)
        with plain, pytest.raises(REFUSED):  # plain HTTP to a TLS port
            plain.is_server_live()
        plain_grpc = grpcclient.InferenceServerClient(gw.grpc_target)
        try:
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                plain_grpc.is_server_live(client_timeout=5)
        finally:
            plain_grpc.close()
    finally:
        assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()
