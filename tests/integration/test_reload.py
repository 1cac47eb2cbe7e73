"""Hot reload through a real gateway: admin API auth, good and bad configs, SIGHUP, in-flight."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.process import ZOO, GatewayProcess, start_gateway, zoo_member

pytestmark = pytest.mark.integration
TOKEN = "s3cret-admin-token"


def config(members: list[str], *, slow: str | None = None, profiles: bool = False) -> dict:
    def member(name: str) -> dict[str, object]:
        place: dict[str, object] = {"tier": "edge"}
        if name == slow:
            place["straggler"] = {"probability": 1.0, "delay_ms": 1500}
        return zoo_member(name, place)

    doc: dict[str, object] = {
        "ensembles": [{"name": "digits", "members": [member(m) for m in members]}],
        "model_zoo": {"dir": str(ZOO)},
    }
    if profiles:
        doc["policies"] = {"vote": {"aggregation": {"name": "majority_vote"}}}
    return doc


@pytest.fixture
def gw(zoo_dir: Path, tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path]]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(["logreg", "forest"], slow="forest")))
    proc = start_gateway(path, tmp_path / "gw.log", env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    yield proc, path
    assert proc.stop() == 0, proc.log()


def infer(gw: GatewayProcess, **parameters: object) -> httpx.Response:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
        "parameters": parameters,
    }
    return httpx.post(f"{gw.http_url}/v2/models/digits/infer", json=body, timeout=30)


def put(gw: GatewayProcess, body: str = "", token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.put(f"{gw.http_url}/admin/config", content=body, headers=headers, timeout=60)


def reloads(gw: GatewayProcess, outcome: str) -> float:
    for line in httpx.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'ensemble_config_reloads_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def inflight(gw: GatewayProcess) -> float:
    for line in httpx.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ensemble_inflight_requests "):
            return float(line.split()[1])
    return 0.0


def test_admin_api_needs_the_token(gw: tuple[GatewayProcess, Path]) -> None:
    proc, _ = gw
    missing = put(proc, token=None)
    assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
    assert "Authorization: Bearer" in missing.json()["error"]
    wrong = put(proc, token="guess")
    assert wrong.status_code == 403 and wrong.json()["error"] == "wrong admin token"
    assert httpx.get(f"{proc.http_url}/admin/config", timeout=10).status_code == 405
    assert reloads(proc, "success") == 0


def test_admin_api_disabled_without_token(gateway: GatewayProcess) -> None:
    resp = httpx.put(
        f"{gateway.http_url}/admin/config",
        content="",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert resp.status_code == 403 and "ENSEMBLE_ADMIN_TOKEN" in resp.json()["error"]


def test_good_reload_applies_atomically_and_inflight_finish_on_old(
    gw: tuple[GatewayProcess, Path],
) -> None:
    proc, _ = gw
    slow_result: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: slow_result.setdefault("r", infer(proc)))
    slow.start()  # waits ~1.5 s on the straggler `forest`
    deadline = time.monotonic() + 30
    while inflight(proc) < 1 and time.monotonic() < deadline:
        pass  # the reload must arrive while that request is in flight
    new = yaml.safe_dump(config(["logreg", "mlp_small"], profiles=True))
    resp = put(proc, new)
    assert resp.status_code == 200, resp.text
    assert resp.json()["reloaded"] is True
    after = infer(proc, policy="vote").json()["parameters"]
    assert after["members_asked"] == "logreg,mlp_small" and after["policy"] == "vote"
    slow.join(timeout=30)
    old = slow_result["r"]
    assert old.status_code == 200
    assert old.json()["parameters"]["members_asked"] == "logreg,forest"  # the old config
    assert reloads(proc, "success") == 1


def test_bad_reload_is_rejected_and_the_old_config_serves(
    gw: tuple[GatewayProcess, Path],
) -> None:
    proc, _ = gw
    bad = yaml.safe_dump(config(["logreg"])).replace("placement:", "placment:")
    resp = put(proc, bad)
    assert resp.status_code == 400
    errors = "\n".join(resp.json()["errors"])
    assert "<admin request>:" in errors and "placment" in errors and "did you mean" in errors
    restart = yaml.safe_dump({**config(["logreg"]), "server": {"http_port": 1}})
    resp = put(proc, restart)
    assert resp.status_code == 400 and "needs a restart" in resp.json()["errors"][0]
    assert put(proc, "ensembles: [").status_code == 400
    assert infer(proc, tier="edge").json()["parameters"]["members_asked"] == "logreg,forest"
    assert reloads(proc, "failure") == 3 and reloads(proc, "success") == 0


def test_sighup_rereads_the_file(gw: tuple[GatewayProcess, Path]) -> None:
    proc, path = gw
    path.write_text(yaml.safe_dump(config(["mlp_small"])))
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if reloads(proc, "success") >= 1:
            break
        time.sleep(0.05)
    assert infer(proc).json()["parameters"]["members_asked"] == "mlp_small"
    put_empty = put(proc, "")  # an empty PUT also re-reads the file
    assert put_empty.status_code == 200 and reloads(proc, "success") == 2


def estimate_calls(gw: GatewayProcess, member: str) -> float:
    prefix = f'ensemble_placement_estimate_calls{{member="{member}",tier="edge"}}'
    for line in httpx.get(f"{gw.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_a_reload_keeps_the_live_estimates_of_unchanged_placements(
    zoo_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(["logreg"])))
    proc = start_gateway(path, tmp_path / "gw.log", env={"ENSEMBLE_ADMIN_TOKEN": TOKEN})
    try:
        for _ in range(20):
            assert infer(proc).status_code == 200
        learned = estimate_calls(proc, "logreg")
        assert learned >= 8  # enough calls to replace the card's figures
        # A new profile, the same placement: the estimates go on from the calls seen.
        assert put(proc, yaml.safe_dump(config(["logreg"], profiles=True))).status_code == 200
        assert infer(proc).status_code == 200
        assert estimate_calls(proc, "logreg") >= learned
    finally:
        assert proc.stop() == 0, proc.log()
