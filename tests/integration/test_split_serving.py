"""Split computing through a real gateway: the zoo's `mlp_deep` split between an emulated slow
edge and a cloud behind an emulated link answers as the unsplit model does (to 1e-5) on every
way it can run, over HTTP and gRPC; its split policy moves the work when the link changes (the
admin API); a request's `tier` keeps its data on that tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import scrape
from tests.integration.conftest import array_input
from tests.integration.process import ZOO, GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
ADMIN = "split-admin-token"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    doc = {
        "tiers": {
            "edge": {"compute_slowdown": 100},
            "cloud": {"link": {"emulate": True, "delay_ms": 0.5, "jitter_ms": 0}},
        },
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    {
                        **zoo_member("mlp_deep"),
                        "placement": [{"tier": "edge"}, {"tier": "cloud"}],
                        "split": {},
                    },
                ],
            }
        ],
    }
    proc = start_from_config(doc, tmp_path_factory.mktemp("split"), {"ENSEMBLE_ADMIN_TOKEN": ADMIN})
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def chosen(url: str) -> str:
    lines = [ln for ln in scrape(url).splitlines() if ln.startswith("ensemble_split_chosen{")]
    [line] = [ln for ln in lines if ln.endswith(" 1.0")]
    return line.split('option="')[1].split('"')[0]


def options(url: str) -> list[str]:
    return [
        ln.split('option="')[1].split('"')[0]
        for ln in scrape(url).splitlines()
        if ln.startswith("ensemble_split_expected_seconds{")
    ]


def test_every_way_answers_as_the_unsplit_model(
    gw: GatewayProcess, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = test_split
    session = ort.InferenceSession(str(ZOO / "mlp_deep.onnx"))
    expected = session.run(["probabilities"], {"input": x[:64]})[0]
    ways = options(gw.http_url)
    assert ways[:2] == ["edge", "cloud"] and len(ways) >= 3  # at least one cut
    with httpx.Client(base_url=gw.http_url, timeout=60) as client:
        for way in ways:
            body = {"inputs": [array_input(x[:64])], "parameters": {"split": way}}
            reply = client.post("/v2/models/mlp_deep/infer", json=body)
            assert reply.status_code == 200, reply.text
            probs = next(o for o in reply.json()["outputs"] if o["name"] == "probabilities")
            got = np.asarray(probs["data"], dtype=np.float32).reshape(64, 10)
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=way)
        bad = client.post(
            "/v2/models/mlp_deep/infer",
            json={"inputs": [array_input(x[:1])], "parameters": {"split": "nowhere"}},
        )
        assert bad.status_code == 400 and "options: edge, cloud" in bad.json()["error"]
    grpc = grpcclient.InferenceServerClient(gw.grpc_target)
    inputs = [grpcclient.InferInput("input", [64, 64], "FP32")]
    inputs[0].set_data_from_numpy(x[:64])
    result = grpc.infer("mlp_deep", inputs, parameters={"split": ways[2]})
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    calls = scrape(gw.http_url)
    for way in ways:
        assert f'ensemble_split_calls_total{{member="mlp_deep",option="{way}"}}' in calls


def test_the_policy_follows_the_link(gw: GatewayProcess) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30, headers=AUTH) as client:
        try:
            # A LAN: the slow edge sends its input to the fast cloud.
            assert chosen(gw.http_url) == "cloud"
            # A far cloud: the work stays on the edge.
            assert client.put("/admin/links/cloud", json={"delay_ms": 200}).status_code == 200
            assert chosen(gw.http_url) == "edge"
            body = {"inputs": [array_input(np.zeros((1, 64), np.float32))]}
            answer = client.post("/v2/models/digits/infer", json=body).json()
            assert "mlp_deep@edge" in answer["parameters"]["members_answered"]
        finally:
            assert client.delete("/admin/links/cloud").status_code == 200
        assert chosen(gw.http_url) == "cloud"


def test_a_requests_tier_keeps_its_data_there(gw: GatewayProcess) -> None:
    body = {"inputs": [array_input(np.zeros((2, 64), np.float32))]}
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        for tier in ("edge", "cloud"):
            reply = client.post(
                "/v2/models/mlp_deep/infer", json={**body, "parameters": {"tier": tier}}
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["parameters"]["members_answered"] == f"mlp_deep@{tier}"
