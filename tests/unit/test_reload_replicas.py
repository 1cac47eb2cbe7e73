"""A reload keeps the replicas the control loop added to unchanged placements (clamped to their
new bounds) and their live estimates, and an ensemble's drift window, on real in-process
repositories; and the process backend's restart backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ensemble.config import GatewayConfig, parse_yaml
from ensemble.control.build import Built, build
from ensemble.control.provisioning import ReplicaSet
from ensemble.control.reload import _carry_state, _keep_replica_counts, _unchanged_placements
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.process import restart_delay

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"


def config(
    edge: str = "{tier: edge, replicas: {min: 1, max: 4}}",
    extra_member: bool = False,
    model: str = "logreg",
    drift_window: int = 500,
) -> GatewayConfig:
    members = f"""
      - name: logreg
        model: {ZOO / f"{model}.onnx"}
        placement: [{edge}, {{tier: cloud, replicas: {{min: 1, max: 3}}}}]"""
    if extra_member:
        members += f"""
      - name: mlp_small
        model: {ZOO / "mlp_small.onnx"}
        placement: [{{tier: edge, replicas: {{min: 1, max: 3}}}}]"""
    text = f"""
ensembles:
  - name: e
    drift: {{window: {drift_window}}}
    members:{members}
autoscaling: {{interval_s: 1, window_s: 5}}
"""
    return parse_yaml(text, source="t.yaml", base_dir=ZOO)


@pytest.fixture
def engine() -> Iterator[InProcessEngine]:
    engine = InProcessEngine(1)
    yield engine
    engine.shutdown()


def grown(cfg: GatewayConfig, engine: InProcessEngine, edge: int) -> Built:
    """The config built, after its provisioner grew logreg@edge to ``edge`` replicas."""
    built = build(cfg, engine)
    built.fleet.provisioners[("logreg", "edge")].keep(edge)
    return built


def edge_names(built: Built, member: str = "logreg") -> list[str]:
    return [r.name for r in built.repository.members[member].serving("edge")]


def test_an_unchanged_placement_keeps_its_replicas(engine: InProcessEngine) -> None:
    cfg = config()
    old = grown(cfg, engine, 3)
    new = build(config(), engine)
    asyncio.run(_keep_replica_counts(cfg, config(), old.fleet, new.fleet))
    assert edge_names(new) == ["edge/0", "edge/1", "edge/2"]
    member = new.repository.members["logreg"]
    # Added like the loop's own replicas: the loop may scale them away again.
    provisioner = new.fleet.provisioners[("logreg", "edge")]
    assert isinstance(provisioner, ReplicaSet) and provisioner.added == ["edge/1", "edge/2"]
    # The cloud placement had its minimum and keeps it.
    assert [r.name for r in member.serving("cloud")] == ["cloud/0"]
    # The old repository is not touched: its requests in flight still have their replicas.
    assert edge_names(old) == ["edge/0", "edge/1", "edge/2"]


def test_the_kept_count_is_clamped_to_the_new_bounds(engine: InProcessEngine) -> None:
    cfg = config()
    old = grown(cfg, engine, 4)
    fewer = config("{tier: edge, replicas: {min: 1, max: 2}}")
    new = build(fewer, engine)
    asyncio.run(_keep_replica_counts(cfg, fewer, old.fleet, new.fleet))
    assert edge_names(new) == ["edge/0", "edge/1"]
    # A new minimum above what it had: the new minimum.
    more = config("{tier: edge, replicas: {min: 3, max: 4}}")
    small = grown(cfg, engine, 2)
    new = build(more, engine)
    asyncio.run(_keep_replica_counts(cfg, more, small.fleet, new.fleet))
    assert edge_names(new) == ["edge/0", "edge/1", "edge/2"]


def test_a_changed_placement_and_a_new_member_start_at_their_minimum(
    engine: InProcessEngine,
) -> None:
    cfg = config()
    old = grown(cfg, engine, 3)
    changed = config(
        "{tier: edge, replicas: {min: 1, max: 4}, straggler: {probability: 0.5, delay_ms: 5}}",
        extra_member=True,
    )
    assert _unchanged_placements(cfg, changed) == {("logreg", "cloud")}
    new = build(changed, engine)
    asyncio.run(_keep_replica_counts(cfg, changed, old.fleet, new.fleet))
    assert edge_names(new) == ["edge/0"]
    assert edge_names(new, "mlp_small") == ["edge/0"]


def test_unchanged_means_the_same_model_and_placement_whatever_the_bounds() -> None:
    cfg = config()
    assert _unchanged_placements(cfg, config("{tier: edge, replicas: {min: 2, max: 8}}")) == {
        ("logreg", "edge"),
        ("logreg", "cloud"),
    }
    assert _unchanged_placements(cfg, config(model="svm")) == set()
    moved = config("{tier: cloud, replicas: {min: 1, max: 4}}")
    assert ("logreg", "edge") not in _unchanged_placements(cfg, moved)


def test_unchanged_placements_keep_their_live_estimates_and_the_drift_window(
    engine: InProcessEngine,
) -> None:
    cfg = config()
    old = build(cfg, engine).repository
    member = old.members["logreg"]
    for tier in ("edge", "cloud"):
        member._estimate(tier).record(0.004, 0.0, "success", 1.0)
    watch = old.ensembles["e"].watch
    assert watch is not None
    watch.observe(np.full((7, 64), 8.0, np.float32))
    changed = config("{tier: edge, replicas: {min: 1, max: 4}, straggler: {probability: 0.5, "
                     "delay_ms: 5}}")  # fmt: skip
    new = build(changed, engine).repository
    _carry_state(old, new, _unchanged_placements(cfg, changed))
    carried = new.members["logreg"].estimates
    assert carried["cloud"] is member.estimates["cloud"]  # unchanged: its estimates go on
    assert "edge" not in carried  # changed (a straggler now): its estimates start over
    assert new.ensembles["e"].watch is not None and new.ensembles["e"].watch._filled == 7
    # A window of another length starts afresh.
    longer = build(config(drift_window=600), engine).repository
    _carry_state(old, longer, _unchanged_placements(cfg, config(drift_window=600)))
    assert longer.ensembles["e"].watch is not None and longer.ensembles["e"].watch._filled == 0


def test_restart_backoff_doubles_from_the_minimum_to_the_maximum() -> None:
    # At once after a child that had served a while, then 1, 2, 4 ... s, never over 30 s.
    delays = [restart_delay(streak, 1.0, 30.0) for streak in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restart_delay(10_000, 1.0, 30.0) == 30.0
