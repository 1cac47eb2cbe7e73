"""Bounded work per request through a real gateway: amplified, oversized and non-finite input
is refused before it is materialised, other clients keep being served, echoed strings are
cut, and every refusal is counted."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
ROW = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
MEMBERS = [zoo_member("logreg"), zoo_member("mlp_small")]


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"ensembles": [{"name": "digits", "members": MEMBERS}]}
    gateway = start_from_config(config, tmp_path_factory.mktemp("bounded"))
    yield gateway
    assert gateway.stop() == 0, gateway.log()
    assert "Traceback" not in gateway.log(), gateway.log()


def metrics(gw: GatewayProcess) -> str:
    return httpx.get(f"{gw.http_url}/metrics", timeout=10).text


def counter(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def amplified_body(numbers: int) -> bytes:
    """gzip of a JSON array of ``numbers`` zeros declared as shape [1, 64]."""
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":['
    return gzip.compress(head + b"0," * (numbers - 1) + b"0]}]}", 9)


def test_amplified_json_is_refused_while_it_inflates(gw: GatewayProcess) -> None:
    body = amplified_body(30_000_000)  # 58 kB on the wire, 60 MB of JSON inflated
    assert len(body) < 100_000
    proc = psutil.Process(gw.proc.pid)
    rss_before = proc.memory_info().rss
    health: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=gw.http_url, timeout=30) as client:
            while not stop.is_set():
                health.append(client.get("/v2/health/ready").status_code)

    prober = threading.Thread(target=probe)
    prober.start()
    for _ in range(500):  # the probe is answering before the attack starts (bounded wait)
        if health:
            break
        threading.Event().wait(0.01)
    try:
        with httpx.Client(timeout=60) as client:
            answers = [
                client.post(
                    f"{gw.http_url}/v2/models/digits/infer",
                    content=body,
                    headers={"content-encoding": "gzip"},
                )
                for _ in range(4)
            ]
    finally:
        stop.set()
        prober.join()
    for answer in answers:
        assert answer.status_code == 413
        assert "65,536 values" in answer.json()["error"]  # 1024 rows x 64 features
    assert health and set(health) == {200}
    # Refused before it was held: the whole array would be about a gigabyte of Python floats.
    assert proc.memory_info().rss - rss_before < 100 * 2**20


def test_compression_bomb_stops_at_the_inflation_ratio(gw: GatewayProcess) -> None:
    bomb = gzip.compress(b"\0" * (80 * 2**20), 9)
    answer = httpx.post(
        f"{gw.http_url}/v2/models/digits/infer",
        content=bomb,
        headers={"content-encoding": "gzip"},
        timeout=60,
    )
    assert answer.status_code == 413
    assert "server.max_inflate_ratio" in answer.json()["error"]


def test_small_compressed_bodies_inflate_past_the_ratio(gw: GatewayProcess) -> None:
    # 64 zeros compress far better than 100:1; under 1 MiB inflated they are harmless.
    doc = {"inputs": [ROW]}
    body = zlib.compress(json.dumps(doc).encode() + b" " * 100_000, 9)
    answer = httpx.post(
        f"{gw.http_url}/v2/models/digits/infer",
        content=body,
        headers={"content-encoding": "deflate"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text


def test_declared_shape_over_the_limit_is_refused_before_the_data(gw: GatewayProcess) -> None:
    # A binary tensor of 2,000 rows: binary_data_size matches, the shape exceeds 1024 rows.
    blob = np.zeros((2000, 64), np.float32).tobytes()
    header = json.dumps(
        {"inputs": [{**ROW, "shape": [2000, 64], "data": None,
                     "parameters": {"binary_data_size": len(blob)}}]}
    ).replace(', "data": null', "").encode()  # fmt: skip
    answer = httpx.post(
        f"{gw.http_url}/v2/models/digits/infer",
        content=header + blob,
        headers={"inference-header-content-length": str(len(header))},
        timeout=30,
    )
    assert answer.status_code == 413
    assert "128,000 elements" in answer.json()["error"]


def test_echoed_strings_are_cut(gw: GatewayProcess) -> None:
    name = "x" * 10_000_000
    doc = {"inputs": [{**ROW, "name": name}]}
    answer = httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=doc, timeout=60)
    assert answer.status_code == 400
    assert len(answer.content) < 4096
    assert "10,000,000 characters" in answer.json()["error"]
    long_id = {"id": "i" * 5000, "inputs": [ROW]}
    answer = httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=long_id, timeout=30)
    assert answer.status_code == 400
    assert "at most 1024" in answer.json()["error"]


def nan_request() -> tuple[bytes, dict[str, str]]:
    x = np.zeros((1, 64), np.float32)
    x[0, 7] = np.nan
    blob = x.tobytes()
    header = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                     "parameters": {"binary_data_size": len(blob)}}]}
    ).encode()  # fmt: skip
    return header + blob, {"inference-header-content-length": str(len(header))}


def test_non_finite_input_is_a_client_error_on_every_route(gw: GatewayProcess) -> None:
    before = counter(metrics(gw), "ensemble_contract_violations_total{")
    body, headers = nan_request()
    for model in ("digits", "logreg"):
        answer = httpx.post(
            f"{gw.http_url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30
        )
        assert answer.status_code == 400, answer.text
        assert "NaN or infinite" in answer.json()["error"]
    client = grpcclient.InferenceServerClient(gw.grpc_target)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = np.inf
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="NaN or infinite") as info:
        client.infer("digits", [inp])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.close()
    assert counter(metrics(gw), "ensemble_contract_violations_total{") == before


def test_refusals_while_decoding_are_counted(gw: GatewayProcess) -> None:
    before = metrics(gw)
    for body in (b"{not json", amplified_body(200_000)):
        headers = {"content-encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
        httpx.post(f"{gw.http_url}/v2/models/digits/infer", content=body, headers=headers)
    after = metrics(gw)
    key = 'ensemble_requests_total{model="digits",outcome="client_error",protocol="http"}'
    assert counter(after, key) - counter(before, key) == 2
    for reason in ("invalid_input", "too_large"):
        key = f'ensemble_rejected_requests_total{{protocol="http",reason="{reason}"}}'
        assert counter(after, key) - counter(before, key) == 1, reason


@pytest.fixture(scope="module")
def lenient(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "server": {"non_finite_inputs": "allow"},
        "ensembles": [{"name": "digits", "members": MEMBERS}],
    }
    gateway = start_from_config(config, tmp_path_factory.mktemp("lenient"))
    yield gateway
    assert gateway.stop() == 0, gateway.log()


def test_allowed_non_finite_input_is_never_an_availability_violation(
    lenient: GatewayProcess,
) -> None:
    body, headers = nan_request()
    answer = httpx.post(
        f"{lenient.http_url}/v2/models/digits/infer", content=body, headers=headers, timeout=30
    )
    # Both members answer NaN with non-finite scores: the input's fault, not theirs.
    assert answer.status_code == 400, answer.text
    assert "non-finite" in answer.json()["error"]
    assert counter(metrics(lenient), "ensemble_contract_violations_total{") == 0
