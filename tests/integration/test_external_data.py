"""A model whose weights are kept in an external data file, through a real gateway: served in
process and by a process replica (`ensemble replica`, which reads and checks the files itself),
answering as onnxruntime does from the files; its pin covers the weights, so a gateway whose
weight file changed refuses to start, naming it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from ensemble.integrity import model_digest
from tests.helpers import save_with_external_data
from tests.integration.process import ZOO, GatewayProcess, start_from_config

pytestmark = pytest.mark.integration
X = np.random.default_rng(11).uniform(0, 16, (4, 64)).astype(np.float32)


def members(model: Path) -> list[dict[str, object]]:
    pin = model_digest(model)
    process = {"tier": "cloud", "backend": "process", "health_check_interval_s": 0.2}
    return [
        {"name": "in_process", "model": str(model), "sha256": pin, "placement": [{"tier": "edge"}]},
        {"name": "in_child", "model": str(model), "sha256": pin, "placement": [process]},
    ]


@pytest.fixture(scope="module")
def served(
    zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Path]]:
    tmp = tmp_path_factory.mktemp("external")
    model = save_with_external_data(ZOO / "mlp_small.onnx", tmp / "mlp.onnx")
    gw = start_from_config({"ensembles": [{"name": "digits", "members": members(model)}]}, tmp)
    yield gw, model
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def test_both_backends_answer_as_onnxruntime_does_from_the_files(
    served: tuple[GatewayProcess, Path],
) -> None:
    gw, model = served
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"input": X})[0]
    client = httpclient.InferenceServerClient(gw.http_target, network_timeout=30)
    try:
        for name in ("in_process", "in_child", "digits"):
            inp = httpclient.InferInput("input", list(X.shape), "FP32")
            inp.set_data_from_numpy(X)
            result = client.infer(name, [inp]).as_numpy("probabilities")
            np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    finally:
        client.close()


def test_a_changed_weight_file_keeps_the_gateway_from_starting(
    zoo_dir: Path, tmp_path: Path
) -> None:
    model = save_with_external_data(ZOO / "mlp_small.onnx", tmp_path / "mlp.onnx")
    config = {"ensembles": [{"name": "digits", "members": members(model)[:1]}]}
    weights = tmp_path / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match=r"did not become ready"):
        start_from_config(config, tmp_path).stop()
    log = (tmp_path / "gw.log").read_text()
    assert "with its external data (weights.bin) has SHA-256" in log, log
