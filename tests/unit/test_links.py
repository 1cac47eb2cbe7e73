"""Emulated links with a fake clock and fake replicas: delay, jitter bounds, loss rate and modes,
bandwidth, partition on and off, runtime overrides, health checks across the link, wiring."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from ensemble.clock import Timer
from ensemble.config import LinkConfig, ProfileConfig, TierConfig, parse_config
from ensemble.control.build import build
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.errors import MemberFailed
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.links import Link, LinkedReplica, Links
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.replicas.oip_http import HttpReplica
from ensemble.replicas.remote import HealthCheck
from ensemble.repository import EnsembleModel, Profile, Repository
from ensemble.types import InferRequest, ModelMetadata, Tensor, TensorSpec

FEED = {"input": np.zeros((1, 64), np.float32)}  # 256 bytes
OUT = {"probabilities": np.zeros((1, 10), np.float32)}  # 40 bytes


class FakeClock:
    """Records every sleep and advances virtual time instead of waiting (a link's calls here run
    one at a time, so no order of wake-ups needs keeping: see ``VirtualClock`` for that)."""

    def __init__(self) -> None:
        self.time_s = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time_s

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.time_s += seconds

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        raise AssertionError("a link only sleeps")


class FakeReplica:
    name = "cloud/0"
    tier = "cloud"

    def __init__(self) -> None:
        self.calls = 0

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        return OUT

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def linked(**settings: Any) -> tuple[LinkedReplica, FakeReplica, FakeClock, Link]:
    clock = FakeClock()
    link = Link("cloud", LinkConfig(emulate=True, **settings), clock=clock)
    inner = FakeReplica()
    return LinkedReplica(inner, link), inner, clock, link


def call(replica: LinkedReplica) -> dict[str, np.ndarray]:
    async def main() -> dict[str, np.ndarray]:
        return await replica.infer(FEED)

    return asyncio.run(main())


def test_delay_is_paid_on_the_request_and_on_the_answer() -> None:
    replica, inner, clock, _ = linked(delay_ms=40)
    assert call(replica) is OUT
    assert inner.calls == 1
    assert clock.sleeps == [pytest.approx(0.04), pytest.approx(0.04)]  # an RTT of 2x


def test_jitter_stays_within_its_bounds_and_never_goes_negative() -> None:
    link = Link("cloud", LinkConfig(emulate=True, delay_ms=10, jitter_ms=4))
    draws = [link.one_way_s(0) for _ in range(2000)]
    assert min(draws) >= 0.006 and max(draws) <= 0.014
    assert max(draws) - min(draws) > 0.007  # it does vary
    wide = Link("cloud", LinkConfig(emulate=True, delay_ms=1, jitter_ms=5))
    assert min(wide.one_way_s(0) for _ in range(2000)) == 0.0


def test_jitter_is_repeatable_with_a_seed() -> None:
    def draws(seed: int) -> list[float]:
        link = Link("cloud", LinkConfig(emulate=True, delay_ms=10, jitter_ms=4, seed=seed))
        return [link.one_way_s(0) for _ in range(20)]

    assert draws(3) == draws(3) != draws(4)


def test_bandwidth_adds_the_transfer_time_of_each_leg() -> None:
    replica, _, clock, _ = linked(delay_ms=0, bandwidth_mbps=1)
    call(replica)
    assert clock.sleeps == [pytest.approx(256 * 8 / 1e6), pytest.approx(40 * 8 / 1e6)]


def test_loss_drops_its_share_of_calls_after_the_drop_timeout() -> None:
    replica, inner, clock, link = linked(delay_ms=1, loss=0.2, drop_timeout_ms=500)

    async def many() -> int:
        failed = 0
        for _ in range(2000):
            try:
                await replica.infer(FEED)
            except MemberFailed as exc:
                assert "dropped" in str(exc)
                failed += 1
        return failed

    failed = asyncio.run(many())
    assert 0.17 < failed / 2000 < 0.23
    assert link.failures["dropped"] == failed and inner.calls == 2000 - failed
    assert clock.sleeps.count(0.5) == failed  # each drop waited the drop timeout


def test_a_drop_waits_no_longer_than_the_calls_timeout() -> None:
    clock = FakeClock()
    link = Link("cloud", LinkConfig(emulate=True, loss=0.99, seed=1), clock=clock)
    replica = LinkedReplica(FakeReplica(), link, timeout_s=0.2)
    with pytest.raises(MemberFailed, match="dropped"):
        call(replica)
    assert clock.sleeps == [0.2]


def test_reset_mode_fails_after_one_way_without_reaching_the_replica() -> None:
    replica, inner, clock, link = linked(delay_ms=30, loss=0.99, loss_mode="reset", seed=1)
    with pytest.raises(MemberFailed, match="connection reset"):
        call(replica)
    assert inner.calls == 0 and clock.sleeps == [pytest.approx(0.03)]
    assert link.failures["reset"] == 1


def test_partition_fails_fast_makes_in_process_replicas_unready_and_heals() -> None:
    replica, inner, clock, link = linked(delay_ms=40)
    assert replica.ready()
    link.override({"partitioned": True})
    assert not replica.ready()
    with pytest.raises(MemberFailed, match="partitioned"):
        call(replica)
    assert inner.calls == 0 and clock.sleeps == []  # fails at once: nothing hangs
    assert link.failures["partitioned"] == 1
    link.override({"partitioned": False})
    assert replica.ready() and call(replica) is OUT


def test_overrides_are_validated_and_kept_across_a_reload() -> None:
    link = Link("cloud", LinkConfig(emulate=True, delay_ms=40))
    with pytest.raises(ValidationError):
        link.override({"loss": 1.5})
    with pytest.raises(ValueError, match="cannot change seed"):
        link.override({"seed": 3})
    assert link.settings.loss == 0 and link.changes == 0  # a bad change changes nothing
    link.override({"partitioned": True, "delay_ms": 5})
    link.configure(LinkConfig(emulate=True, delay_ms=80, jitter_ms=2))
    assert link.settings.partitioned and link.settings.delay_ms == 5
    assert link.settings.jitter_ms == 2
    link.clear()
    assert not link.settings.partitioned and link.settings.delay_ms == 80
    assert link.describe()["overrides"] == {}


def test_links_outlive_reloads_and_drop_removed_tiers() -> None:
    links = Links({"edge": TierConfig(), "cloud": TierConfig(link=LinkConfig(emulate=True))})
    cloud = links.get("cloud")
    assert cloud is not None
    cloud.override({"partitioned": True})
    links.configure({"cloud": TierConfig(link=LinkConfig(emulate=True, delay_ms=9))})
    assert links.get("cloud") is cloud and cloud.settings.partitioned
    assert links.get("edge") is None
    assert [r.tier for r in links.readings()] == ["cloud"]


def test_link_state_is_in_the_metrics() -> None:
    links = Links({"cloud": TierConfig(link=LinkConfig(emulate=True, delay_ms=40))})
    metrics = GatewayMetrics()
    metrics.links = links.readings
    cloud = links.get("cloud")
    assert cloud is not None
    cloud.override({"partitioned": True})
    text = metrics.exposition()[0].decode()
    assert 'ensemble_link_partitioned{tier="cloud"} 1.0' in text
    assert 'ensemble_link_delay_seconds{tier="cloud"} 0.04' in text
    assert 'ensemble_link_changes_total{tier="cloud"} 1.0' in text


def test_remote_health_checks_cross_the_link() -> None:
    async def main() -> list[bool]:
        clock = FakeClock()
        link = Link("cloud", LinkConfig(emulate=True, delay_ms=5), clock=clock)
        remote = HttpReplica(
            "cloud/0",
            "cloud",
            "http://replica.test:9000",
            "m",
            (TensorSpec("probabilities", "FP32", (-1, 10)),),
            health=HealthCheck(interval_s=0.01, timeout_s=0.5, unhealthy_threshold=1),
        )
        remote.transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
        remote.link = link
        replica = LinkedReplica(remote, link, timeout_s=1.0, health_checked=True)
        seen = []
        await replica.start()
        seen.append(replica.ready())
        link.override({"partitioned": True})
        seen.append(replica.ready())  # follows the checks, not the switch
        for _ in range(200):
            await asyncio.sleep(0.005)
            if not replica.ready():
                break
        seen.append(replica.ready())
        assert "partitioned" in (remote.last_check_error or "")
        link.override({"partitioned": False})
        for _ in range(200):
            await asyncio.sleep(0.005)
            if replica.ready():
                break
        seen.append(replica.ready())
        await replica.close()
        return seen

    assert asyncio.run(main()) == [True, True, False, True]


CONFIG = """
tiers:
  edge: {}
  cloud: {link: {emulate: true, delay_ms: 40}}
ensembles:
  - name: digits
    members:
      - {name: logreg, model: %(zoo)s/logreg.onnx, placement: [{tier: edge}, {tier: cloud}]}
"""


def test_only_emulated_tiers_get_a_wrapper(zoo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(yaml.safe_load(CONFIG % {"zoo": zoo_dir}), base_dir=tmp_path)
    engine = InProcessEngine(1)
    try:
        links = Links(cfg.tiers)
        repo = build(cfg, engine, links=links).repository
        edge, cloud = repo.members["logreg"].replicas
        assert not isinstance(edge, LinkedReplica)
        assert isinstance(cloud, LinkedReplica) and cloud.link is links.get("cloud")
    finally:
        engine.shutdown()


def test_link_config_validation_names_the_problem() -> None:
    with pytest.raises(ValidationError, match="loss_mode"):
        LinkConfig(emulate=True, loss_mode="drop")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="drop_timeout_ms"):
        LinkConfig(drop_timeout_ms=0)


# -- through the dispatcher: a partitioned tier's members make answers degraded ---------------


class Fixed:
    """An edge replica answering class probabilities [0.8, 0.2]."""

    name = "edge/0"

    def __init__(self, tier: str) -> None:
        self.tier = tier

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return {"probs": np.tile(np.float32([0.8, 0.2]), (len(feed["x"]), 1))}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def test_answers_without_a_partitioned_tiers_members_are_degraded() -> None:
    clock = FakeClock()
    link = Link("cloud", LinkConfig(emulate=True, delay_ms=5), clock=clock)
    x = (TensorSpec("x", "FP32", (-1, 2)),)
    out = (TensorSpec("probs", "FP32", (-1, 2)),)
    schema = ClassifierSchema("probs", (0, 1), logits=False)
    edge = Member("near", x, out, schema, [Fixed("edge")])
    cloud = Member("far", x, out, schema, [LinkedReplica(Fixed("cloud"), link)])
    members = {"near": edge, "far": cloud}
    metadata = ModelMetadata(
        "e", ("1",), "ensemble", x, (TensorSpec("label", "INT64", (-1,)), out[0])
    )
    profiles = {"default": Profile.build("default", ProfileConfig())}
    ensemble = EnsembleModel("e", members, profiles, "default", (0, 1), metadata)
    dispatcher = Dispatcher(Repository([ensemble], [edge, cloud]), GatewayMetrics())
    request = InferRequest(
        "e", None, [Tensor("x", "FP32", (1, 2), np.zeros((1, 2), np.float32))], None, None, {}
    )

    async def ask() -> dict[str, Any]:
        return dict((await dispatcher.infer(request, "http")).parameters)

    whole = asyncio.run(ask())
    assert whole["completeness"] == 1.0 and "degraded" not in whole
    assert clock.sleeps == [0.005, 0.005]
    link.override({"partitioned": True})
    cut = asyncio.run(ask())
    assert cut["degraded"] is True and cut["violations"] == "availability"
    assert cut["unreachable"] == "far" and cut["members_answered"] == "near@edge"
    link.override({"partitioned": False})
    assert "degraded" not in asyncio.run(ask())


def test_link_fault_events_validate_their_params() -> None:
    from loadtest import faults

    partition = faults.validate_params("partition", {"tier": "cloud", "duration_s": 5})
    assert not faults.needs_process("partition")  # it goes through the admin API
    assert partition.model_dump()["token_env"] == "ENSEMBLE_ADMIN_TOKEN"
    change = faults.validate_params("link", {"tier": "cloud", "duration_s": 1, "delay_ms": 80})
    assert isinstance(change, faults.LinkParams)
    assert change.changes() == {"delay_ms": 80}
    with pytest.raises(ValidationError):
        faults.validate_params("partition", {"tier": "cloud"})  # how long is required
    with pytest.raises(ValidationError):
        faults.validate_params("link", {"tier": "cloud", "duration_s": 1, "loss": 1})
