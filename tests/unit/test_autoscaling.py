"""Autoscaling in virtual time: the `target_inflight` policy's rule and hysteresis, and the control
loop's observation and decisions on a real repository with a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensemble.config import parse_yaml
from ensemble.control.build import build, replica_bounds
from ensemble.control.loop import ControlLoop
from ensemble.control.provisioning import ReplicaSet
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.engine import InProcessEngine
from policies import registry
from policies.autoscaling import TargetInflight, TargetInflightParams
from policies.base import AutoscalingPolicy, PlacementLoad, ScalingContext

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"


def load(outstanding: float, replicas: int = 1, low: int = 1, high: int = 4) -> PlacementLoad:
    return PlacementLoad("m", "edge", replicas, low, high, outstanding, 10.0, 5.0)


def test_target_inflight_follows_ray_serves_rule_with_hysteresis() -> None:
    policy = TargetInflight(TargetInflightParams(upscale_delay_s=3, downscale_delay_s=30))
    state = policy.initial_state()
    decision, state = policy.decide(ScalingContext(0.0, (load(7.0),)), state)
    assert decision.targets == {}  # 7 in flight / 2 -> 4, but only wanted since now
    decision, state = policy.decide(ScalingContext(2.0, (load(7.0),)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ScalingContext(3.0, (load(7.0),)), state)
    assert decision.targets == {("m", "edge"): 4}
    assert "7.0 calls in flight / target 2 per replica -> 4" in decision.reasons[("m", "edge")]
    # More than the bounds allow is capped; a quiet placement goes down only after 30 s.
    decision, state = policy.decide(ScalingContext(4.0, (load(99.0, 4),)), state)
    assert decision.targets == {}  # already at max
    decision, state = policy.decide(ScalingContext(5.0, (load(0.0, 4),)), state)
    decision, state = policy.decide(ScalingContext(34.0, (load(0.0, 4),)), state)
    assert decision.targets == {}
    decision, state = policy.decide(ScalingContext(35.0, (load(0.0, 4),)), state)
    assert decision.targets == {("m", "edge"): 1}  # never below min


def test_a_wish_that_changes_restarts_its_delay() -> None:
    policy = TargetInflight(TargetInflightParams(upscale_delay_s=2))
    state = policy.initial_state()
    _, state = policy.decide(ScalingContext(0.0, (load(4.0),)), state)  # wants 2
    _, state = policy.decide(ScalingContext(1.5, (load(6.0),)), state)  # now wants 3
    decision, state = policy.decide(ScalingContext(2.5, (load(6.0),)), state)
    assert decision.targets == {}
    decision, _ = policy.decide(ScalingContext(3.5, (load(6.0),)), state)
    assert decision.targets == {("m", "edge"): 3}


def test_registered_and_validated() -> None:
    assert isinstance(
        registry.build("autoscaling", "target_inflight", {}, AutoscalingPolicy), TargetInflight
    )
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        registry.build(
            "autoscaling", "target_inflight", {"target_ongoing_requests": 0}, AutoscalingPolicy
        )


CONFIG = f"""
ensembles:
  - name: e
    members:
      - name: logreg
        model: {ZOO / "logreg.onnx"}
        placement: [{{tier: edge, replicas: {{min: 1, max: 3}}}},
                    {{tier: cloud, backend: oip-http, endpoints: ["http://127.0.0.1:9"]}}]
autoscaling: {{interval_s: 1, window_s: 5,
              policy: {{name: target_inflight,
                      params: {{upscale_delay_s: 0, downscale_delay_s: 0}}}}}}
"""


def test_bounds_per_member_and_tier() -> None:
    cfg = parse_yaml(CONFIG, source="t.yaml", base_dir=ZOO)
    assert replica_bounds(cfg) == {("logreg", "edge"): (1, 3), ("logreg", "cloud"): (1, 1)}


def test_the_loop_scales_an_in_process_placement_up_and_drains_it_down() -> None:
    cfg = parse_yaml(CONFIG, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    async def main() -> None:
        built = build(cfg, engine)
        repository = built.repository
        metrics = GatewayMetrics()
        now = [100.0]
        loop = ControlLoop(lambda: built.fleet, metrics, clock=lambda: now[0])
        member = repository.members["logreg"]
        (edge,) = member.serving("edge")
        for _ in range(5):  # five calls in flight on the edge replica
            member.stats[edge.name].started()
        await loop.tick()
        assert loop.desired == {("logreg", "edge"): 3}  # ceil(5 / 2) = 3, the max
        assert [r.name for r in member.serving("edge")] == ["edge/0", "edge/1", "edge/2"]
        assert loop.replicas[("logreg", "edge")] == 3
        assert metrics.scaling_decisions[("logreg", "edge", "up")] == 1
        desired = metrics.registry.get_sample_value(
            "ensemble_autoscaler_replicas", {"member": "logreg", "tier": "edge", "kind": "desired"}
        )
        assert desired == 3
        # The new replicas answer like the first one.
        x = {"input": np.full((1, 64), 8.0, np.float32)}
        answers = [await r.infer(x) for r in member.serving("edge")]
        assert all(np.array_equal(a["label"], answers[0]["label"]) for a in answers)
        # The load goes; edge/0 still has five calls in flight, the new ones none.
        now[0] += 10  # the busy samples have left the 5 s window
        member.stats["edge/2"].started()  # one call still running on edge/2
        await loop.tick()
        assert loop.desired == {}  # 6 in flight: 3 wanted, 3 there
        assert len(member.serving("edge")) == 3
        for _ in range(5):
            member.stats["edge/0"].finished(0.01, True)
        now[0] += 10
        await loop.tick()  # 1 in flight -> 1 replica: edge/1 and edge/2 leave
        assert [r.name for r in member.serving("edge")] == ["edge/0"]
        await asyncio.sleep(0.05)
        assert "edge/1" not in member.stats  # idle: gone at once
        assert [r.name for r in member.replicas if r.tier == "edge"] == ["edge/0", "edge/2"]
        member.stats["edge/2"].finished(0.01, True)  # its last call ends: it goes too
        await asyncio.sleep(0.05)
        assert [r.name for r in member.replicas if r.tier == "edge"] == ["edge/0"]
        assert metrics.scaling_decisions[("logreg", "edge", "down")] == 1
        # The cloud placement (remote endpoints) is observed only and never changes.
        assert [r.name for r in member.replicas if r.tier == "cloud"] == ["cloud/0"]

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_loop_accounts_replica_seconds_and_their_price() -> None:
    priced = CONFIG.replace(
        "ensembles:", "tiers: {edge: {cost_per_replica_hour: 3.6}, cloud: {}}\nensembles:", 1
    )
    cfg = parse_yaml(priced, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    async def main() -> None:
        built = build(cfg, engine)
        metrics = GatewayMetrics()
        now = [0.0]
        loop = ControlLoop(lambda: built.fleet, metrics, clock=lambda: now[0])
        await loop.tick()  # the first tick only starts the clock
        assert metrics.replica_seconds == {}
        now[0] = 10.0
        await loop.tick()
        # One edge replica and one cloud endpoint for 10 s; edge costs 3.6 per replica-hour.
        assert metrics.replica_seconds == {("logreg", "edge"): 10.0, ("logreg", "cloud"): 10.0}
        assert metrics.spend == {("edge", "replicas"): pytest.approx(0.01)}
        spent = metrics.registry.get_sample_value(
            "ensemble_spend_total", {"tier": "edge", "kind": "replicas"}
        )
        assert spent == pytest.approx(0.01)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_replica_leaving_takes_its_counters_not_the_rate() -> None:
    cfg = parse_yaml(CONFIG, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    async def main() -> None:
        built = build(cfg, engine)
        repository = built.repository
        loop = ControlLoop(lambda: built.fleet, GatewayMetrics(), clock=lambda: 0.0)
        member = repository.members["logreg"]
        (replica,) = member.serving("edge")
        provisioner = built.fleet.provisioners[("logreg", "edge")]
        assert isinstance(provisioner, ReplicaSet)
        extra = provisioner.make("edge/1")
        await extra.start()
        member.add_replica(extra)
        for name, n in ((replica.name, 30), ("edge/1", 20)):
            for _ in range(n):
                member.stats[name].started()
                member.stats[name].finished(0.01, True)
        (first,) = [x for x in loop._observe(built.fleet, 0.0, 5.0) if x.tier == "edge"]
        await member.retire("edge/1", 1.0)  # drained at once: no call in flight
        for _ in range(10):
            member.stats[replica.name].started()
            member.stats[replica.name].finished(0.01, True)
        (second,) = [x for x in loop._observe(built.fleet, 1.0, 5.0) if x.tier == "edge"]
        assert second.arrival_rps == 10.0  # 10 new calls in 1 s, not (40 - 50) / 1
        assert first.replicas == 2 and second.replicas == 1

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_service_time_leaves_out_an_emulated_links_round_trip() -> None:
    linked = f"""
tiers: {{edge: {{}}, cloud: {{link: {{emulate: true, delay_ms: 10}}}}}}
ensembles:
  - name: e
    members:
      - name: logreg
        model: {ZOO / "logreg.onnx"}
        placement: [{{tier: edge}}, {{tier: cloud}}]
autoscaling: {{policy: {{name: r3e}}}}
"""
    cfg = parse_yaml(linked, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    async def main() -> None:
        built = build(cfg, engine)
        repository = built.repository
        loop = ControlLoop(lambda: built.fleet, GatewayMetrics(), clock=lambda: 0.0)
        member = repository.members["logreg"]
        # Both replicas answered in 70 ms: the edge replica took all of it, the cloud one
        # 50 ms (its link's two 10 ms legs are time on the wire).
        for replica in member.replicas:
            for _ in range(20):
                member.stats[replica.name].started()
                member.stats[replica.name].finished(0.07, True)
        loads = {x.tier: x for x in loop._observe(built.fleet, 0.0, 5.0)}
        assert loads["edge"].service_ms == pytest.approx(70.0)
        assert loads["edge"].link_ms == 0.0
        assert loads["cloud"].service_ms == pytest.approx(50.0)
        assert loads["cloud"].link_ms == pytest.approx(20.0)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_loops_p95_is_over_its_window_not_the_last_128_calls() -> None:
    cfg = parse_yaml(CONFIG, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    def calls(stats: Any, latency_s: float, n: int) -> None:
        for _ in range(n):
            stats.started()
            stats.finished(latency_s, True)

    async def main() -> None:
        built = build(cfg, engine)
        repository = built.repository
        loop = ControlLoop(lambda: built.fleet, GatewayMetrics(), clock=lambda: 0.0)
        member = repository.members["logreg"]
        (replica,) = member.serving("edge")
        stats = member.stats[replica.name]

        def edge_p95(now: float) -> float | None:
            (load,) = [x for x in loop._observe(built.fleet, now, 5.0) if x.tier == "edge"]
            return load.p95_ms

        assert edge_p95(0.0) is None  # no call yet
        calls(stats, 0.4, 40)  # a burst: 400 ms calls
        assert edge_p95(1.0) == pytest.approx(400.0)
        calls(stats, 0.01, 30)  # then fast ones, within the same window
        assert edge_p95(2.0) == pytest.approx(400.0)
        edge_p95(5.0)
        calls(stats, 0.01, 30)  # by 8 s the burst has left the 5 s window
        assert edge_p95(8.0) == pytest.approx(10.0)
        assert stats.p95_s == pytest.approx(0.4)  # routing's 128-call p95 still holds it

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


class TwoWorkers:
    """The control loop's view of a gateway of two workers: this one leads (or not), the other
    reports ``other`` as its load, and published targets are kept."""

    def __init__(self, leads: bool, other: tuple[PlacementLoad, ...]) -> None:
        self.leads = leads
        self.workers = 2
        self.other = other
        self.published: list[dict[tuple[str, str], int]] = []

    async def loads(self) -> list[tuple[PlacementLoad, ...]]:
        return [self.other]

    def publish(self, targets: dict[tuple[str, str], int]) -> None:
        self.published.append(targets)


def test_the_leader_decides_from_every_workers_load_and_followers_only_apply() -> None:
    """Five calls in flight on this worker's edge replica and one on the other's: a per-worker
    placement is judged on the average worker (3 in flight -> 2 replicas each), a shared one
    (the remote cloud endpoint) on the sum; the targets are published, not applied at once, and
    replica-seconds count every worker's in-process replicas."""
    cfg = parse_yaml(CONFIG, source="t.yaml", base_dir=ZOO)
    engine = InProcessEngine(1)

    async def main() -> None:
        built = build(cfg, engine)
        member = built.repository.members["logreg"]
        other = (
            PlacementLoad("logreg", "edge", 1, 1, 3, 1.0, 4.0, None),
            PlacementLoad("logreg", "cloud", 1, 1, 1, 2.0, 6.0, None),
        )
        peers = TwoWorkers(True, other)
        now = [0.0]
        metrics = GatewayMetrics()
        loop = ControlLoop(lambda: built.fleet, metrics, clock=lambda: now[0], peers=peers)
        for _ in range(5):
            member.stats["edge/0"].started()
        await loop.tick()
        assert peers.published == [{("logreg", "edge"): 2}]  # ceil(((5 + 1) / 2) / 2)
        assert len(member.serving("edge")) == 1  # applied when the change comes back
        await loop.apply(peers.published[0])
        assert len(member.serving("edge")) == 2
        now[0] = 10.0
        await loop.tick()
        assert metrics.replica_seconds[("logreg", "edge")] == 20.0 * 2  # both workers' replicas
        assert metrics.replica_seconds[("logreg", "cloud")] == 10.0  # one shared endpoint
        follower = ControlLoop(lambda: built.fleet, GatewayMetrics(), peers=TwoWorkers(False, ()))
        await follower.tick()  # a follower does not decide
        assert follower.desired == {}

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
