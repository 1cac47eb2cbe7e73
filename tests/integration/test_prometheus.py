"""The alerting rules and the Grafana dashboard against real Prometheus tools: `promtool check`
and `promtool test rules` on deploy/prometheus/ (every alert unit-tested firing and quiet),
then a real Prometheus (Debian's package) on loopback scraping a real gateway: it loads and
evaluates every rule without error, its recorded R3E measures (availability, degraded share,
shed share, spend, replicas per tier, ejections) have the values a healthy gateway gives, the
dashboard has a panel for each category it promises, and every query of every panel runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ensemble.replicas.process import cli_command
from tests.helpers import wait_for
from tests.integration.conftest import good_input
from tests.integration.process import ROOT, GatewayProcess, free_port, start_from_config, zoo_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "ensemble-gateway.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

# What the dashboard shows, each by a word of a panel's title and what that panel's queries use
# (metric or recorded series names, and the `by` of a per member and tier breakdown).
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "traffic": ("traffic", ("ensemble_requests_total",)),
    "SLO attainment, availability": ("slo attainment", ("ensemble:request_errors:ratio_rate",)),
    "SLO attainment, latency": ("slo attainment", ("ensemble:request_slow:ratio_rate",)),
    "error-budget burn rates": ("burn rate", ("ensemble:shed_requests:ratio_rate1h",)),
    "accuracy": ("accuracy", ("ensemble_member_rolling_accuracy",)),
    "cost": ("cost", ("ensemble_spend_total",)),
    "cost per request": ("cost", ("ensemble_cost_total",)),
    "replicas per tier": ("replicas per tier", ("by (tier)", "ensemble_autoscaler_replicas")),
    "degraded share": ("degraded", ("ensemble:degraded_answers:ratio_rate",)),
    "hedges and retries": (
        "hedges and retries",
        ("ensemble_hedges_total", "ensemble_retries_total"),
    ),
    "member calls per member and tier": (
        "member and tier",
        ("by (member, tier", "ensemble_member_calls_total"),
    ),
    "queue, compute and link time per member and tier": (
        "stage",
        ("by (member, tier, stage", "ensemble_member_stage_duration_seconds_bucket"),
    ),
}
# Categories with series once the test gateway has served requests (no feedback labels were
# posted, no hedges or retries were needed).
HAS_DATA = set(CATEGORIES) - {"accuracy", "cost per request", "hedges and retries"}


def promtool(*args: str) -> str:
    """``promtool ARGS`` in deploy/prometheus/; its output (an assertion when it fails)."""
    assert PROMTOOL is not None, "promtool missing: apt-get install prometheus (.ci/run does)"
    done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rules_in_file() -> list[dict[str, Any]]:
    groups = yaml.safe_load((RULES / "ensemble-rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_are_valid_and_pass_their_unit_tests() -> None:
    rules = rules_in_file()
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "ensemble-rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "ensemble-rules.test.yml")
    promtool("check", "config", "prometheus.yml")


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    alerts = {rule["alert"] for rule in rules_in_file() if "alert" in rule}
    tests = yaml.safe_load((RULES / "ensemble-rules.test.yml").read_text())["tests"]
    checks = [check for test in tests for check in test.get("alert_rule_test", [])]
    assert {c["alertname"] for c in checks} <= alerts  # no test of an alert that is gone
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == alerts  # each fires
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == alerts  # each stays quiet


def test_burn_rate_alerts_use_a_long_and_a_short_window() -> None:
    rules = rules_in_file()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    windows = {"FastBurn": ("1h", "5m"), "SlowBurn": ("6h", "30m")}
    burns = [rule for rule in rules if rule.get("alert", "").endswith(tuple(windows))]
    assert len(burns) == 10  # availability, latency, degraded, shed, cost: fast and slow each
    for rule in burns:
        long, short = windows[rule["alert"][-8:]]
        series = re.findall(r"(ensemble:[a-z_]+:[a-z_]*rate)(\w+) >", rule["expr"])
        assert [w for _, w in series] == [long, short], rule["alert"]
        assert {name + w for name, w in series} <= recorded, rule["alert"]
        assert series[0][0] == series[1][0] and re.search(r"\band\b", rule["expr"]), rule["alert"]
    ejections = next(rule for rule in rules if rule.get("alert") == "EnsembleReplicaEjections")
    assert "increase1h" in ejections["expr"] and "increase15m" in ejections["expr"]


OTHER_OBJECTIVES_TEST = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  # 1 request in 11 fails (9 %): over the slow threshold of a 99 % objective (6 %), under its
  # fast one (14.4 %); 4 in 10 take over 250 ms: over 95 %'s slow threshold (30 %) only.
  - interval: 1m
    input_series:
      - series: 'ensemble_requests_total{model="digits",protocol="http",outcome="success"}'
        values: '0+600x90'
      - series: 'ensemble_requests_total{model="digits",protocol="http",outcome="server_error"}'
        values: '0+60x90'
      - series: 'ensemble_request_duration_seconds_bucket{model="digits",protocol="http",le="0.25"}'
        values: '0+6x90'
      - series: 'ensemble_request_duration_seconds_count{model="digits",protocol="http"}'
        values: '0+10x90'
    alert_rule_test:
      - eval_time: 70m
        alertname: EnsembleErrorBudgetFastBurn
        exp_alerts: []
      - eval_time: 70m
        alertname: EnsembleErrorBudgetSlowBurn
        exp_alerts:
          - exp_labels: {severity: ticket, model: digits}
            exp_annotations:
              summary: "digits burns its error budget 6x too fast"
              description: "More than 6 % of digits's requests failed on the gateway's side
                (5xx) over the last 6 hours and 30 minutes (SLO 99 %)."
      - eval_time: 70m
        alertname: EnsembleLatencyBudgetFastBurn
        exp_alerts: []
      - eval_time: 70m
        alertname: EnsembleLatencyBudgetSlowBurn
        exp_alerts:
          - exp_labels: {severity: ticket, model: digits}
            exp_annotations:
              summary: "digits is slow: its latency budget burns 6x too fast"
              description: "More than 30 % of digits's requests took over 250 ms over the last
                6 hours and 30 minutes (SLO 95 % within 250 ms)."
"""


def test_rules_for_other_objectives_load_and_fire_at_their_thresholds(tmp_path: Path) -> None:
    """`ensemble rules` run as a command with other objectives: promtool loads the result, and
    its alerts fire at the new thresholds (and quote them), not at the defaults'."""
    made = subprocess.run(
        cli_command(
            *("rules", "--availability", "99", "--latency", "95", "--latency-bound", "0.25"),
            *("--out", str(tmp_path / "rules.yml")),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "test.yml").write_text(OTHER_OBJECTIVES_TEST)
    assert PROMTOOL is not None, "promtool missing: apt-get install prometheus (.ci/run does)"
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "test.yml"]):
        done = subprocess.run(
            [PROMTOOL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    doc: dict[str, object] = {
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


@pytest.fixture(scope="module")
def traffic(gw: GatewayProcess, prometheus: str) -> str:
    """Inference requests until Prometheus has recorded their rate (two scrapes saw them)."""
    with httpx.Client(base_url=gw.http_url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for _ in range(20):
                reply = client.post("/v2/models/digits/infer", json={"inputs": [good_input()]})
                assert reply.status_code == 200
            if query(prometheus, "ensemble:requests:rate5m"):
                break
    assert query(prometheus, "ensemble:requests:rate5m"), "no request rate recorded in 60 s"
    return prometheus


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's series (an assertion naming the query when it fails or is no vector)."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    assert reply["data"]["resultType"] == "vector", (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def values(url: str, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Each series' value, keyed by the values of ``labels``."""
    return {
        tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
        for r in query(url, expr)
    }


def settled(url: str, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    """``values`` once Prometheus has any (a rate needs two scrapes of its counter)."""
    wait_for(lambda: query(url, expr), f"Prometheus has {expr}", 30, interval_s=0.5)
    return values(url, expr, *labels)


def current_rules(url: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [r for g in groups for r in g["rules"]]


def test_a_real_prometheus_evaluates_the_rules_on_a_real_gateway(traffic: str) -> None:
    url = traffic
    assert values(url, "ensemble:requests:rate5m", "model")[("digits",)] > 0
    # Availability and degraded share: every request answered, by every member.
    assert values(url, "ensemble:request_errors:ratio_rate5m", "model") == {("digits",): 0.0}
    assert values(url, "ensemble:degraded_answers:ratio_rate5m", "ensemble") == {("digits",): 0.0}
    assert values(url, "ensemble:degraded_answers:ratio_rate1h", "ensemble") == {("digits",): 0.0}
    # Shed share: nothing shed, so 0 (not absent) for the whole gateway.
    assert values(url, "ensemble:shed_requests:ratio_rate1h") == {(): 0.0}
    # Elasticity: replicas per tier.
    replicas = values(url, 'sum by (tier) (ensemble_autoscaler_replicas{kind="current"})', "tier")
    assert set(replicas) == {("edge",), ("cloud",)} and min(replicas.values()) >= 1
    # Reliability: every replica ready; resilience: none ejected.
    assert values(url, "sum(ensemble_replica_ready)")[()] >= 2
    ejections = settled(url, "ensemble:replica_ejections:increase1h", "member", "tier")
    assert ejections == {("logreg", "edge"): 0.0, ("forest", "cloud"): 0.0}
    # Cost: the cloud replicas' price (0.36 an hour each, at most 2), well inside the budget.
    spend = settled(url, "ensemble:spend:rate5m")
    assert set(spend) == {()} and 0 < spend[()] < 14.4, spend

    names = [r.get("record") or r["alert"] for r in rules_in_file()]
    loaded = current_rules(url)
    assert sorted(r["name"] for r in loaded) == sorted(names)
    wait_for(
        lambda: all(r.get("health") == "ok" for r in current_rules(url)),
        "every rule evaluated without error",
        30,
        interval_s=0.5,
        detail=lambda: json.dumps([r for r in current_rules(url) if r.get("health") != "ok"]),
    )
    firing = [r["name"] for r in current_rules(url) if r.get("state") == "firing"]
    assert firing == [], firing  # a healthy gateway pages nobody


def panel_queries(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel["targets"]]


def run_on_prometheus(expr: str) -> str:
    """A panel's query with Grafana's variables as the dashboard's defaults would set them."""
    return expr.replace("$model", ".*").replace("$__rate_interval", "5m")


def category_panels(panels: list[dict[str, Any]], category: str) -> list[dict[str, Any]]:
    word, uses = CATEGORIES[category]
    return [
        p
        for p in panels
        if word in p["title"].lower() and all(any(u in e for e in panel_queries(p)) for u in uses)
    ]


def test_the_dashboard_has_a_panel_for_each_category(traffic: str) -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for category, (word, uses) in CATEGORIES.items():
        found = category_panels(panels, category)
        assert found, f"no panel for {category}: a title with {word!r} querying {uses}"
        if category in HAS_DATA:  # the gateway served requests: a query of it has series
            metric = uses[-1]
            exprs = [e for p in found for e in panel_queries(p) if metric in e]
            assert any(query(traffic, run_on_prometheus(e)) for e in exprs), (category, exprs)
    by_title = {p["title"]: p for p in panels}

    # Hedges and retries per member and tier.
    hedges = next(p for t, p in by_title.items() if "hedges and retries" in t.lower())
    assert all("by (member, tier" in query for query in panel_queries(hedges))

    # On the test gateway: queue and compute time per member and tier (in-process members, no
    # emulated link, so no `link` stage).
    stages = next(p for t, p in by_title.items() if "stage" in t.lower())
    for expr in panel_queries(stages):
        seen = values(traffic, run_on_prometheus(expr), "member", "tier", "stage")
        assert {("logreg", "edge", "queue"), ("forest", "cloud", "compute")} <= set(seen), seen
        assert all(v >= 0 for v in seen.values()), seen

    # Burn rates: each divided by the budget its fast-burn alert assumes.
    burn = next(p for t, p in by_title.items() if "burn rate" in t.lower())
    alerts = {r["alert"]: r["expr"] for r in rules_in_file() if "alert" in r}
    for expr in panel_queries(burn):
        match = re.fullmatch(r"(ensemble:\w+:\w+)(?:\{.*\})? / ([0-9.]+)", expr)
        assert match, expr
        record, budget = match.groups()
        alert = f"{record} > (14.4 * {budget})"
        assert any(alert in e for e in alerts.values()), f"{expr}: no fast burn with {alert}"
    rates = values(traffic, run_on_prometheus(panel_queries(burn)[0]), "model")
    assert rates == {("digits",): 0.0}  # the availability budget, untouched


def test_every_dashboard_query_runs(traffic: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ensemble-gateway"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for expr in panel_queries(panel):
            query(traffic, run_on_prometheus(expr))  # a vector, or the assertion names the query
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    models = httpx.get(
        f"{traffic}/api/v1/label/model/values",
        params={"match[]": "ensemble_requests_total"},
        timeout=10,
    ).json()["data"]
    assert "digits" in models and "ensemble_requests_total" in variable["definition"]
