"""`ensemble replica`: one zoo model served over OIP, checked with tritonclient over both
protocols: health, metadata, inference, bad input, metrics, and the SIGTERM drain."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ensemble.replicas.onnx import load_session
from tests.helpers import metric
from tests.integration.process import ZOO, GatewayProcess, inflight, start_replica

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["grpcio", "uvicorn"])
def replica(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    """`ensemble replica` on each gRPC stack."""
    log = tmp_path_factory.mktemp("replica") / "replica.log"
    stack = ["--grpc-stack", request.param]
    proc = start_replica(ZOO / "logreg.onnx", log, "--name", "digits_lr", *stack)
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What onnxruntime itself answers for the same file: (label, probabilities)."""
    label, probs = load_session(ZOO / "logreg.onnx").run(["label", "probabilities"], {"input": x})
    return label, probs


def test_http_health_metadata_and_config(replica: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(replica.http_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits_lr")
        assert not client.is_model_ready("logreg")  # served under --name only
        meta = client.get_model_metadata("digits_lr")
        assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
        assert client.get_model_config("digits_lr")["name"] == "digits_lr"
        index = client.get_model_repository_index()
        assert [(m["name"], m["state"]) for m in index] == [("digits_lr", "READY")]
    finally:
        client.close()


def test_http_inference_matches_onnxruntime(
    replica: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_split
    x = x[:64]
    client = httpclient.InferenceServerClient(replica.http_target)
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary tensor extension
        result = client.infer("digits_lr", [inp])
    finally:
        client.close()
    label, probs = reference(x)
    assert np.array_equal(result.as_numpy("label"), label)
    assert np.allclose(result.as_numpy("probabilities"), probs, atol=1e-6)
    assert np.mean(label == y[:64]) > 0.9


def test_grpc_health_metadata_and_inference(replica: GatewayProcess) -> None:
    client = grpcclient.InferenceServerClient(replica.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits_lr")
        meta = client.get_model_metadata("digits_lr")
        assert [t.name for t in meta.outputs] == ["label", "probabilities"]
        x = np.random.default_rng(1).uniform(0, 16, (5, 64)).astype(np.float32)
        inp = grpcclient.InferInput("input", [5, 64], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(
            "digits_lr", [inp], outputs=[grpcclient.InferRequestedOutput("label")]
        )
        assert np.array_equal(result.as_numpy("label"), reference(x)[0])
        assert result.as_numpy("probabilities") is None  # only what was asked for
    finally:
        client.close()


def test_bad_input_is_400_and_invalid_argument(replica: GatewayProcess) -> None:
    x = np.zeros((1, 63), np.float32)
    http = httpclient.InferenceServerClient(replica.http_target)
    grpc = grpcclient.InferenceServerClient(replica.grpc_target)
    try:
        inp = httpclient.InferInput("input", [1, 63], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as err:
            http.infer("digits_lr", [inp])
        assert err.value.status() == "400" and "shape" in str(err.value.message())
        ginp = grpcclient.InferInput("input", [1, 63], "FP32")
        ginp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as err:
            grpc.infer("digits_lr", [ginp])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert http.is_server_ready()  # still serving
    finally:
        http.close()
        grpc.close()


def test_metrics_and_no_admin_api(replica: GatewayProcess) -> None:
    with httpx.Client(base_url=replica.http_url, timeout=10) as client:
        client.post(
            "/v2/models/digits_lr/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}
                ]
            },
        ).raise_for_status()
        text = client.get("/metrics").text
        assert (
            'ensemble_requests_total{model="digits_lr",outcome="success",protocol="http"}' in text
        )
        assert (
            'ensemble_replica_ready{member="digits_lr",replica="local/0",tier="local"} 1.0' in text
        )
        # Its own queue and compute time per call, as Triton's server reports its own: what
        # a gateway calling it sees as one remote call is split here.
        for stage in ("queue", "compute"):
            series = (
                f'ensemble_member_stage_duration_seconds_count{{member="digits_lr",'
                f'stage="{stage}",tier="local"}}'
            )
            assert metric(text, series) >= 1, stage
        # The process collectors: its CPU and memory.
        assert metric(text, "process_cpu_seconds_total") > 0
        assert metric(text, "process_resident_memory_bytes") > 0
        assert client.put("/admin/config", content=b"").status_code == 404


def test_sigterm_drains_inflight_requests_then_exits_0(zoo_dir: Path, tmp_path: Path) -> None:
    # One onnxruntime thread and big batches of the large MLP (a few hundred ms each): the
    # requests are in flight, most of them queued, when the signal arrives.
    flags = ("--executor-threads", "1", "--max-batch-size", "4096")
    proc = start_replica(ZOO / "mlp_large.onnx", tmp_path / "r.log", *flags)
    x = np.random.default_rng(0).uniform(0, 16, (4096, 64)).astype(np.float32)

    def call() -> int:
        client = httpclient.InferenceServerClient(proc.http_target, network_timeout=120)
        try:
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return len(client.infer("mlp_large", [inp]).as_numpy("label"))
        finally:
            client.close()

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call) for _ in range(8)]
            deadline = time.monotonic() + 30
            # The last bodies may still be arriving (uvicorn drains those too).
            while inflight(proc.http_url) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert inflight(proc.http_url) >= 6
            proc.proc.send_signal(signal.SIGTERM)
            answered = [f.result() for f in futures]
        assert answered == [4096] * 8  # none lost
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log()
