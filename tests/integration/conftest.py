"""A real `ensemble serve` process on the default config, shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.process import ROOT, GatewayProcess, RayCluster, start_gateway

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@pytest.fixture(scope="session")
def gateway(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_gateway(DEFAULT_CONFIG, tmp_path_factory.mktemp("gw") / "gateway.log")
    yield proc
    code = proc.stop()
    assert code == 0, f"gateway exited {code} after SIGTERM\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="session")
def test_split(zoo_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(zoo_dir / "test.npz")
    return data["X"].astype(np.float32), data["y"].astype(np.int64)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A two-node Ray cluster on loopback (`edge` and `cloud` nodes), one per test module."""
    ray = RayCluster(tmp_path_factory.mktemp("cluster") / "cluster.log")
    yield ray
    ray.close()


@pytest.fixture(scope="module")
def raw(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """A plain HTTP client on the shared gateway, for requests tritonclient will not send."""
    with httpx.Client(base_url=gateway.http_url, timeout=30) as client:
        yield client


def good_input(**over: object) -> dict[str, object]:
    """A valid `digits` input tensor in OIP JSON, with fields replaced by ``over``."""
    base: dict[str, object] = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 64],
        "data": [0.0] * 64,
    }
    base.update(over)
    return base


def array_input(x: np.ndarray) -> dict[str, object]:
    """``x`` (FP32, shape [batch, 64]) as the `digits` input tensor in OIP JSON."""
    return good_input(shape=list(x.shape), data=x.ravel().tolist())
