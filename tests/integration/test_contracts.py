"""Per-request contracts through real servers: deadlines, partial answers, tiers, profiles."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("contracts")

    config = {
        "tiers": {"edge": {}, "cloud": {"cost_per_request": 0.001}},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg"),
                    zoo_member("forest"),
                    # every call to this cloud member answers 400 ms late
                    zoo_member(
                        "mlp_small",
                        {"tier": "cloud", "straggler": {"probability": 1.0, "delay_ms": 400}},
                    ),
                ],
            }
        ],
        "policies": {"vote": {"aggregation": {"name": "majority_vote"}}},
    }
    gw = start_from_config(config, tmp)
    yield gw
    assert gw.stop() == 0


def x_one(zoo_dir: Path) -> np.ndarray:
    return np.load(zoo_dir / "test.npz")["X"][:1].astype(np.float32)


def http_infer(gw: GatewayProcess, zoo_dir: Path, **kw: object) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(gw.http_target, network_timeout=30)
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_one(zoo_dir))
    return client.infer("digits", [inp], **kw)


def test_without_deadline_every_member_answers(gateway: GatewayProcess, zoo_dir: Path) -> None:
    params = http_infer(gateway, zoo_dir).get_response()["parameters"]
    assert params["completeness"] == 1.0
    assert "deadline_met" not in params


def test_deadline_answers_with_what_arrived(gateway: GatewayProcess, zoo_dir: Path) -> None:
    start = time.perf_counter()
    # tritonclient's own `timeout` argument: microseconds, sent as the request parameter
    result = http_infer(gateway, zoo_dir, timeout=150_000)
    elapsed = time.perf_counter() - start
    params = result.get_response()["parameters"]
    assert params["deadline_met"] is False
    assert set(params["members_answered"].split(",")) == {"logreg@edge", "forest@edge"}
    assert params["members_asked"] == "logreg,forest,mlp_small"
    assert params["completeness"] == pytest.approx(2 / 3, abs=1e-5)
    assert elapsed < 0.4  # did not wait for the straggler
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_deadline_over_grpc_with_tritonclient(gateway: GatewayProcess, zoo_dir: Path) -> None:
    client = grpcclient.InferenceServerClient(gateway.grpc_target)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_one(zoo_dir))
    result = client.infer("digits", [inp], timeout=150_000)
    params = result.get_response().parameters
    assert params["deadline_met"].bool_param is False
    assert "mlp_small" not in params["members_answered"].string_param
    client.close()


def test_nothing_in_time_is_a_timeout_error(gateway: GatewayProcess, zoo_dir: Path) -> None:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 64],
                "data": x_one(zoo_dir).ravel().tolist(),
            }
        ],
        "parameters": {"timeout": 1, "tier": "cloud"},
    }
    resp = httpx.post(f"{gateway.http_url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 504 and "timeout" in resp.json()["error"]
    client = grpcclient.InferenceServerClient(gateway.grpc_target)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_one(zoo_dir))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [inp], timeout=1, parameters={"tier": "cloud"})
    assert "DEADLINE_EXCEEDED" in str(info.value.status())
    client.close()


def test_tier_restriction_keeps_data_on_the_edge(gateway: GatewayProcess, zoo_dir: Path) -> None:
    params = http_infer(gateway, zoo_dir, parameters={"tier": "edge"}).get_response()["parameters"]
    assert params["members_asked"] == "logreg,forest"
    assert all(m.endswith("@edge") for m in params["members_answered"].split(","))


def test_request_names_a_profile(gateway: GatewayProcess, zoo_dir: Path) -> None:
    params = http_infer(
        gateway, zoo_dir, parameters={"policy": "vote", "tier": "edge"}
    ).get_response()["parameters"]
    assert params["policy"] == "vote"
    assert params["confidence"] in (0.5, 1.0)  # vote share of two members


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"timeout": -1}, "'timeout' must be between"),
        ({"tier": "moon"}, "'tier' must be one of"),
        ({"policy": "turbo"}, "'policy' names no profile"),
        ({"min_accuracy": 2}, "'min_accuracy' must be between"),
    ],
)
def test_bad_contracts_are_client_errors(
    gateway: GatewayProcess, zoo_dir: Path, parameters: dict[str, object], fragment: str
) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
        "parameters": parameters,
    }
    resp = httpx.post(f"{gateway.http_url}/v2/models/digits/infer", json=body, timeout=30)
    assert resp.status_code == 400 and fragment in resp.json()["error"]
    client = grpcclient.InferenceServerClient(gateway.grpc_target)
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x_one(zoo_dir))
    # tritonclient reserves the `timeout` parameter for its own `timeout=` argument
    kwargs = {"timeout": parameters["timeout"]} if "timeout" in parameters else {}
    others = {k: v for k, v in parameters.items() if k != "timeout"}
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [inp], parameters=others or None, **kwargs)
    assert "INVALID_ARGUMENT" in str(info.value.status()) and fragment in info.value.message()
    client.close()
