"""The alerting rules and the Grafana dashboard against real Prometheus tools: `promtool check`
and `promtool test rules` on deploy/prometheus/, then a real Prometheus (Debian's package) on
loopback scraping a real gateway: it evaluates every rule without error, answers queries for
the R3E measures (availability, degraded share, replicas per tier, ejections), and every query
of every dashboard panel runs without error."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import wait_for
from tests.integration.conftest import good_input
from tests.integration.process import ROOT, GatewayProcess, free_port, start_from_config, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "ensemble-gateway.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def promtool(*args: str) -> str:
    """``promtool ARGS`` in deploy/prometheus/; its output (an assertion when it fails)."""
    assert PROMTOOL is not None, "promtool missing: apt-get install prometheus (.ci/run does)"
    done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_are_valid_and_pass_their_unit_tests() -> None:
    assert "SUCCESS: 23 rules found" in promtool("check", "rules", "ensemble-rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "ensemble-rules.test.yml")
    promtool("check", "config", "prometheus.yml")


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    doc = {
        "tiers": {"edge": {}, "cloud": {"cost_per_replica_hour": 0.36}},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    zoo_member("logreg", {"tier": "edge", "replicas": {"min": 1, "max": 2}}),
                    zoo_member("forest", {"tier": "cloud", "replicas": {"min": 1, "max": 2}}),
                ],
            }
        ],
        "autoscaling": {"interval_s": 1, "window_s": 5, "policy": {"name": "r3e"}},
    }
    proc = start_from_config(doc, tmp_path_factory.mktemp("gw"))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def prometheus(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None, "prometheus missing: apt-get install prometheus (.ci/run does)"
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "ensemble-rules.yml")],
        "scrape_configs": [
            {"job_name": "ensemble-gateway", "static_configs": [{"targets": [gw.http_target]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: ready(url),
            "Prometheus ready",
            60,
            interval_s=0.2,
            detail=lambda: (tmp / "prometheus.log").read_text(),
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def test_a_real_prometheus_evaluates_the_rules_on_a_real_gateway(
    gw: GatewayProcess, prometheus: str
) -> None:
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # traffic until two scrapes saw it, bounded
            for _ in range(20):
                reply = client.post("/v2/models/digits/infer", json={"inputs": [good_input()]})
                assert reply.status_code == 200
            if query(prometheus, "ensemble:requests:rate5m"):
                break
    rate = {
        r["metric"]["model"]: float(r["value"][1])
        for r in query(prometheus, "ensemble:requests:rate5m")
    }
    assert rate["digits"] > 0
    errors = query(prometheus, 'ensemble:request_errors:ratio_rate5m{model="digits"}')
    assert float(errors[0]["value"][1]) == 0.0  # availability: every request answered
    assert query(prometheus, "ensemble:degraded_answers:ratio_rate5m")  # degraded share: 0
    replicas = query(prometheus, 'sum by (tier) (ensemble_autoscaler_replicas{kind="current"})')
    assert {r["metric"]["tier"] for r in replicas} == {"edge", "cloud"}  # elasticity
    assert query(prometheus, "sum(ensemble_replica_ready)")  # reliability
    assert query(prometheus, "ensemble:replica_ejections:increase15m") is not None  # resilience
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 23
    wait_for(
        lambda: all(r.get("health") == "ok" for r in current_rules(prometheus)),
        "every rule evaluated without error",
        30,
        interval_s=0.5,
    )
    firing = [r["name"] for r in current_rules(prometheus) if r.get("state") == "firing"]
    assert firing == [], firing  # a healthy gateway pages nobody


def current_rules(url: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [r for g in groups for r in g["rules"]]


def test_every_dashboard_query_runs(gw: GatewayProcess, prometheus: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ensemble-gateway"
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 10 and len(targets) >= 20
    for target in targets:
        expr = target["expr"].replace("$model", ".*").replace("$__rate_interval", "1m")
        query(prometheus, expr)  # status success, or the assertion names the query
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    values = httpx.get(
        f"{prometheus}/api/v1/label/model/values",
        params={"match[]": "ensemble_requests_total"},
        timeout=10,
    ).json()["data"]
    assert "digits" in values and "ensemble_requests_total" in variable["definition"]
