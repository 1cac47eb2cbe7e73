"""Admission control through a real gateway: one request runs, one waits, the rest are shed at
once with 429 + Retry-After (gRPC RESOURCE_EXHAUSTED, tritonclient), the least important first;
shed requests are counted in /metrics."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers import metric, scrape
from tests.integration.conftest import array_input
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
SLOW_MS = 400
X = np.random.default_rng(1).uniform(0, 16, (1, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    slow: dict[str, object] = {
        "tier": "edge",
        "straggler": {"probability": 1.0, "delay_ms": SLOW_MS},
    }
    config: dict[str, object] = {
        "ensembles": [{"name": "slow", "members": [zoo_member("logreg", slow)]}],
        "admission": {
            "name": "bounded",
            "params": {"max_running": 1, "max_waiting": 1, "retry_after_s": 2},
        },
    }
    gateway = start_from_config(config, tmp_path_factory.mktemp("admission"))
    yield gateway
    assert gateway.stop() == 0, gateway.log()


def post(gw: GatewayProcess, priority: int, out: list[tuple[int, Any, dict[str, str]]]) -> None:
    body = {"inputs": [array_input(X)], "parameters": {"priority": priority}}
    answer = httpx.post(f"{gw.http_url}/v2/models/slow/infer", json=body, timeout=30)
    out.append((priority, answer.status_code, dict(answer.headers)))


def burst(gw: GatewayProcess, priorities: list[int], gap_s: float = 0.05) -> list[Any]:
    """Send one request per priority, ``gap_s`` apart, all in flight together."""
    out: list[tuple[int, Any, dict[str, str]]] = []
    threads = []
    for priority in priorities:
        thread = threading.Thread(target=post, args=(gw, priority, out))
        thread.start()
        threads.append(thread)
        threading.Event().wait(gap_s)
    for thread in threads:
        thread.join()
    return sorted(out, key=lambda row: row[0])


def test_over_capacity_requests_are_shed_with_retry_after(gw: GatewayProcess) -> None:
    # priority 1 runs, 3 waits, 7 finds the queue full (less important than 3): shed at once;
    # then 0 arrives, outranks the waiting 3, which is shed to make room.
    rows = burst(gw, [1, 3, 7, 0])
    status = {priority: code for priority, code, _ in rows}
    assert status == {0: 200, 1: 200, 3: 429, 7: 429}
    for priority, code, headers in rows:
        if code == 429:
            assert headers["retry-after"] == "2", priority
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    assert 'ensemble_shed_requests_total{reason="full"} 1.0' in text
    assert 'ensemble_shed_requests_total{reason="evicted"} 1.0' in text
    assert "ensemble_admission_running 0.0" in text


def test_the_shed_answer_is_an_oip_error_body(gw: GatewayProcess) -> None:
    out: list[tuple[int, Any, dict[str, str]]] = []
    threads = [threading.Thread(target=post, args=(gw, 0, out)) for _ in range(2)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.1)
    body = {"inputs": [array_input(X)], "parameters": {"priority": 0}}
    answer = httpx.post(f"{gw.http_url}/v2/models/slow/infer", json=body, timeout=30)
    for thread in threads:
        thread.join()
    assert answer.status_code == 429
    assert set(answer.json()) == {"error"} and "overloaded" in answer.json()["error"]


def test_grpc_clients_get_resource_exhausted(gw: GatewayProcess) -> None:
    errors: list[InferenceServerException] = []

    def call() -> None:
        with grpcclient.InferenceServerClient(gw.grpc_target) as client:
            tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            try:
                client.infer("slow", [tensor])
            except InferenceServerException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
        threading.Event().wait(0.05)
    for thread in threads:
        thread.join()
    assert len(errors) == 2
    assert all("RESOURCE_EXHAUSTED" in str(e.status()) for e in errors), errors


def shed_count(gw: GatewayProcess) -> float:
    """The gateway's count of requests shed because the gate was full (0 before the first)."""
    text = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
    prefix = 'ensemble_shed_requests_total{reason="full"} '
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


def test_a_full_gate_sheds_a_request_without_priority_before_decoding_it(
    gw: GatewayProcess,
) -> None:
    # One request runs and one waits; a request that sets no priority could not outrank the
    # waiting one, so it is refused before its body is decoded: even a malformed body gets
    # 429, not 400 (nothing was spent on it). An unknown model is still a 404.
    before = shed_count(gw)
    out: list[tuple[int, Any, dict[str, str]]] = []
    threads = [threading.Thread(target=post, args=(gw, 0, out)) for _ in range(2)]
    for thread in threads:
        thread.start()
        threading.Event().wait(0.05)
    threading.Event().wait(0.1)
    url = f"{gw.http_url}/v2/models/slow/infer"
    garbage = httpx.post(url, content=b'{"inputs": "not a list"}', timeout=30)
    good = httpx.post(url, json={"inputs": [array_input(X)]}, timeout=30)
    unknown = httpx.post(
        f"{gw.http_url}/v2/models/nope/infer", json={"inputs": [array_input(X)]}, timeout=30
    )
    for thread in threads:
        thread.join()
    assert [code for _, code, _ in out] == [200, 200]
    for answer in (garbage, good):
        assert answer.status_code == 429, answer.text
        assert answer.headers["retry-after"] == "2"
        assert set(answer.json()) == {"error"} and "overloaded" in answer.json()["error"]
    assert unknown.status_code == 404
    assert shed_count(gw) == before + 2
    # With room again, the malformed body is the client's error as usual.
    assert httpx.post(url, content=b'{"inputs": "not a list"}', timeout=30).status_code == 400


# -- adaptive: the limit follows measured service time ------------------------------------

ROWS = 64
HEAVY = np.random.default_rng(2).uniform(0, 16, (ROWS, 64)).astype(np.float32)
INITIAL_LIMIT = 16
CLIENTS = 16


@pytest.fixture(scope="module")
def adaptive_gw(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    # One executor thread, no batching: service time grows with the requests running at once,
    # the signal the adaptive limit reads.
    config: dict[str, object] = {
        "server": {"executor_threads": 1, "batching": False},
        "ensembles": [{"name": "heavy", "members": [zoo_member("svm"), zoo_member("mlp_large")]}],
        "admission": {
            "name": "adaptive",
            "params": {
                "initial_limit": INITIAL_LIMIT,
                "min_limit": 1,
                "max_limit": 64,
                "headroom": 1,
                "waiting_per_limit": 0.5,
                "window_requests": 8,
                "window_ms": 50,
                "retry_after_s": 3,
            },
        },
    }
    gateway = start_from_config(config, tmp_path_factory.mktemp("adaptive"))
    yield gateway
    assert gateway.stop() == 0, gateway.log()


def hammer(gw: GatewayProcess, clients: int, duration_s: float) -> list[tuple[int, float, str]]:
    """``clients`` closed-loop clients for ``duration_s``, each pausing 0.2 s after a 429:
    (status, latency s, Retry-After) of every request."""
    # Binary tensors: the body is parsed before the gate, for shed requests too, so keep it cheap.
    tensor: dict[str, object] = {"name": "input", "datatype": "FP32", "shape": [ROWS, 64]}
    tensor["parameters"] = {"binary_data_size": HEAVY.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"timeout": 5_000_000}}).encode()
    body = header + HEAVY.astype("<f4").tobytes()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    out: list[tuple[int, float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=gw.http_url, timeout=30) as http:
            while not stop.is_set():
                start = time.perf_counter()
                answer = http.post("/v2/models/heavy/infer", content=body, headers=headers)
                elapsed = time.perf_counter() - start
                out.append((answer.status_code, elapsed, answer.headers.get("retry-after", "")))
                if answer.status_code == 429:
                    stop.wait(0.2)  # backs off (less than Retry-After, to keep the overload)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop.wait(duration_s)
    stop.set()
    for thread in threads:
        thread.join()
    return out


def test_adaptive_limit_sheds_overload_and_keeps_admitted_requests_fast(
    adaptive_gw: GatewayProcess,
) -> None:
    alone = sorted(latency for _, latency, _ in hammer(adaptive_gw, 1, 1.0))
    assert metric(scrape(adaptive_gw.http_url), "ensemble_admission_limit", None) is not None
    rows = hammer(adaptive_gw, CLIENTS, 4.0)
    codes = Counter(code for code, _, _ in rows)
    assert set(codes) <= {200, 429} and codes[200] > 0 and codes[429] > 0, codes
    assert {after for code, _, after in rows if code == 429} == {"3"}
    limit = metric(scrape(adaptive_gw.http_url), "ensemble_admission_limit", None)
    assert limit is not None and limit < INITIAL_LIMIT
    # Without admission all 16 clients' requests would queue, each taking about 16 times one
    # request alone (one executor thread). The limit keeps admitted requests a few requests
    # deep (it settles near 2 running and 1 waiting: 0.5 * limit + headroom = limit).
    admitted = sorted(latency for code, latency, _ in rows if code == 200)
    median_alone = alone[len(alone) // 2]
    median_admitted = admitted[len(admitted) // 2]
    assert median_admitted < CLIENTS / 2 * median_alone, (
        median_admitted,
        median_alone,
        limit,
        codes,
    )
