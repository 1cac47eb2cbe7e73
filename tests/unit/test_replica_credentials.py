"""Credentials for remote replicas: the config's rules (TLS files, an API key only over TLS or
loopback), and what the oip-http and oip-grpc clients send. A real `ensemble replica` with
mutual TLS and API keys is in tests/integration/test_replica_credentials.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trustme

from ensemble.config import load_config
from ensemble.replicas.credentials import ClientCredentials
from ensemble.replicas.oip_grpc import GrpcReplica
from ensemble.replicas.oip_http import HttpReplica
from ensemble.types import TensorSpec
from tests.unit.test_config import GOOD, errors_of, write

OUTPUTS = (TensorSpec("probabilities", "FP32", (-1, 10)),)
KEY_ENV = "REPLICA_KEY_FOR_TESTS"


def config_with(tmp_path: Path, placement: str) -> Path:
    text = GOOD.replace("[{tier: edge}]", f"[{placement}]")
    return write(tmp_path, text)


def pem_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("client@example.test")
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    (tmp_path / "client.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (
            "{tier: edge, backend: oip-http, endpoints: ['http://h:1'], tls: {}}",
            "tls: for https:// endpoints only, not 'http://h:1'",
        ),
        (
            "{tier: edge, backend: oip-http, endpoints: ['http://10.0.0.5:1'], api_key_env: K}",
            "the key would cross the network in clear text to 'http://10.0.0.5:1'; use an "
            "https:// endpoint",
        ),
        (
            "{tier: edge, backend: oip-grpc, endpoints: ['cloud.example:1'], api_key_env: K}",
            "the key would cross the network in clear text to 'cloud.example:1'; use `tls`",
        ),
        (
            "{tier: edge, backend: oip-grpc, endpoints: ['h:1'], tls: {}, api_key_env: 1K}",
            "api_key_env '1K' is not an environment variable name",
        ),
        (
            "{tier: edge, backend: triton, endpoints: ['h:1'], tls: {cert_file: c.pem}}",
            "cert_file and key_file come together",
        ),
        ("{tier: edge, tls: {}}", "tls: only for the remote backends"),
        ("{tier: edge, backend: process, api_key_env: K}", "api_key_env: only for the remote"),
    ],
)
def test_credential_rules_explain_themselves(tmp_path: Path, placement: str, message: str) -> None:
    [err] = errors_of(config_with(tmp_path, placement))
    assert "ensembles[0].members[0].placement[0]" in err
    assert message in err


def test_files_and_the_key_are_checked_when_the_config_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "ca.pem").write_text("not a certificate")
    placement = (
        "{tier: edge, backend: oip-grpc, endpoints: ['h:1'], "
        f"tls: {{ca_file: ca.pem}}, api_key_env: {KEY_ENV}}}"
    )
    errors = errors_of(config_with(tmp_path, placement))
    assert any("placement[0].tls.ca_file" in e and "no PEM certificate" in e for e in errors)
    assert any(f"environment variable {KEY_ENV} is not set" in e for e in errors)


def test_a_good_placement_loads_with_paths_beside_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "k")
    pem_files(tmp_path)
    placement = (
        "{tier: edge, backend: oip-http, endpoints: ['https://h:1', 'http://127.0.0.1:2'], "
        "tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client.key}, "
        f"api_key_env: {KEY_ENV}}}"
    )
    with pytest.raises(Exception, match="for https:// endpoints only"):
        load_config(config_with(tmp_path, placement))  # tls with an http:// endpoint
    placement = placement.replace("'http://127.0.0.1:2'", "'https://127.0.0.1:2'")
    (place,) = load_config(config_with(tmp_path, placement)).ensembles[0].members[0].placement
    assert place.tls is not None and place.tls.ca_file == Path("ca.pem")
    # A key to a loopback endpoint may go in clear text.
    loopback = "{tier: edge, backend: oip-grpc, endpoints: ['localhost:1', '[::1]:2'], "
    assert load_config(config_with(tmp_path, loopback + f"api_key_env: {KEY_ENV}}}"))


def test_the_http_client_sends_the_key_on_calls_and_checks() -> None:
    seen: list[tuple[str, str | None]] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        return httpx.Response(200, json={"ready": True})

    async def main() -> None:
        replica = HttpReplica(
            "r",
            "edge",
            "http://127.0.0.1:9",
            "m",
            OUTPUTS,
            credentials=ClientCredentials(tls=False, api_key="s3cret"),
        )
        replica.transport = httpx.MockTransport(server)
        await replica.start()
        try:
            with pytest.raises(Exception):  # noqa: B017 (the fake answers no tensors)
                await replica.infer({"input": np.zeros((1, 64), np.float32)}, ["probabilities"])
        finally:
            await replica.close()

    asyncio.run(main())
    assert ("/v2/models/m/ready", "Bearer s3cret") in seen
    assert ("/v2/models/m/infer", "Bearer s3cret") in seen


def test_the_grpc_client_gets_tls_and_sends_the_key(tmp_path: Path) -> None:
    pem_files(tmp_path)
    made: list[tuple[str, ClientCredentials | None]] = []
    headers: list[dict[str, str] | None] = []

    class Client:
        async def is_model_ready(self, model: str, **kwargs: Any) -> bool:
            headers.append(kwargs.get("headers"))
            return True

        async def close(self) -> None:
            pass

    credentials = ClientCredentials(
        tls=True,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "client.pem",
        key_file=tmp_path / "client.key",
        api_key="s3cret",
    )

    async def main() -> None:
        replica = GrpcReplica("r", "edge", "h:1", "m", OUTPUTS, credentials=credentials)

        def connect(endpoint: str, given: ClientCredentials | None) -> Client:
            made.append((endpoint, given))
            return Client()

        replica.connect = connect  # type: ignore[method-assign]
        await replica.start()
        await replica.close()

    asyncio.run(main())
    assert made == [("h:1", credentials)]
    assert headers[0] == {"authorization": "Bearer s3cret"}
    assert credentials.grpc_credentials() is not None  # the files make channel credentials
    assert credentials.ssl_context().verify_mode.name == "CERT_REQUIRED"


def test_gateway_replicas_on_ray_get_the_keys_in_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ensemble.serve_app import _gateway_actor

    monkeypatch.setenv(KEY_ENV, "k")
    placement = (
        f"{{tier: edge, backend: oip-grpc, endpoints: ['127.0.0.1:1'], api_key_env: {KEY_ENV}}}"
    )
    cfg = load_config(config_with(tmp_path, placement))
    assert _gateway_actor(cfg)["runtime_env"]["env_vars"][KEY_ENV] == "k"
