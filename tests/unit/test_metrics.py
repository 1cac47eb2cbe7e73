"""The gateway's metrics: plain counters on the hot path, standard exposition on scrape."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ensemble.metrics import LATENCY_BUCKETS_S, GatewayMetrics


def families(metrics: GatewayMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(body.decode())
    }


def test_counters_histograms_and_gauges_expose() -> None:
    m = GatewayMetrics()
    m.readiness = lambda: {"digits": True, "logreg": False}
    m.record_request("digits", "http", "success", 0.0004)
    m.record_request("digits", "http", "success", 0.02)
    m.record_request("", "grpc", "client_error", 0.001)
    m.record_member_call("logreg", "edge", "success", 0.0001)
    m.record_completeness("digits", 5, 4)
    m.inflight = 3
    f = families(m)
    assert (
        "ensemble_requests_total",
        {"model": "digits", "protocol": "http", "outcome": "success"},
        2.0,
    ) in f["ensemble_requests"]
    assert (
        "ensemble_requests_total",
        {"model": "", "protocol": "grpc", "outcome": "client_error"},
        1.0,
    ) in f["ensemble_requests"]
    latency = {
        (s[0], s[1].get("le")): s[2]
        for s in f["ensemble_request_duration_seconds"]
        if s[1].get("model") == "digits"
    }
    assert latency[("ensemble_request_duration_seconds_bucket", "0.00025")] == 0.0
    assert latency[("ensemble_request_duration_seconds_bucket", "0.0005")] == 1.0
    assert latency[("ensemble_request_duration_seconds_bucket", "0.025")] == 2.0
    assert latency[("ensemble_request_duration_seconds_bucket", "+Inf")] == 2.0
    assert latency[("ensemble_request_duration_seconds_count", None)] == 2.0
    assert abs(latency[("ensemble_request_duration_seconds_sum", None)] - 0.0204) < 1e-9
    # unknown models are counted but get no latency series
    assert all(s[1].get("model") != "" for s in f["ensemble_request_duration_seconds"])
    assert ("ensemble_members_asked_total", {"ensemble": "digits"}, 5.0) in f[
        "ensemble_members_asked"
    ]
    assert f["ensemble_inflight_requests"] == [("ensemble_inflight_requests", {}, 3.0)]
    assert ("ensemble_model_ready", {"model": "logreg"}, 0.0) in f["ensemble_model_ready"]


def test_bucket_edges_are_inclusive() -> None:
    m = GatewayMetrics()
    for bound in LATENCY_BUCKETS_S:
        m.record_member_call("a", "edge", "success", bound)
    f = families(m)
    buckets = [s for s in f["ensemble_member_call_duration_seconds"] if s[0].endswith("_bucket")]
    assert [s[2] for s in buckets] == [float(i + 1) for i in range(len(LATENCY_BUCKETS_S))] + [
        float(len(LATENCY_BUCKETS_S))
    ]


def test_each_gateway_has_its_own_registry() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.record_request("digits", "http", "success", 0.001)
    assert "digits" not in b.exposition()[0].decode()


def test_replica_readiness_and_ejection_are_gauges_per_replica() -> None:
    m = GatewayMetrics()
    m.replicas = lambda: [
        ("logreg", "edge/0", "edge", False, True, 2, 3),
        ("logreg", "cloud/0", "cloud", True, False, 0, 0),
    ]
    f = families(m)
    edge = {"member": "logreg", "replica": "edge/0", "tier": "edge"}
    cloud = {"member": "logreg", "replica": "cloud/0", "tier": "cloud"}
    assert ("ensemble_replica_ready", edge, 0.0) in f["ensemble_replica_ready"]
    assert ("ensemble_replica_ready", cloud, 1.0) in f["ensemble_replica_ready"]
    assert ("ensemble_replica_ejected", edge, 1.0) in f["ensemble_replica_ejected"]
    assert ("ensemble_replica_ejections_total", edge, 2.0) in f["ensemble_replica_ejections"]
    assert ("ensemble_replica_restarts_total", edge, 3.0) in f["ensemble_replica_restarts"]
    assert ("ensemble_replica_restarts_total", cloud, 0.0) in f["ensemble_replica_restarts"]
