"""The data plane's seams: one repository snapshot per request (a reload mid-request never mixes
two configs), the catalog both frontends render, the cells shared state lives in, and the
provisioners the control plane scales with."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import numpy as np
import pytest

from ensemble.clock import Clock, VirtualClock
from ensemble.config import ProfileConfig
from ensemble.control.provisioning import ReplicaSet, Static
from ensemble.dataplane.catalog import model_config, repository_index
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import ClassifierSchema, Member
from ensemble.repository import EnsembleModel, Profile, Repository
from ensemble.state import LocalCell
from ensemble.types import InferRequest, ModelMetadata, RoutingContext, Tensor, TensorSpec
from policies import registry
from policies.base import RoutingPolicy

X = (TensorSpec("x", "FP32", (-1, 2)),)
OUT = (TensorSpec("probs", "FP32", (-1, 2)),)
SCHEMA = ClassifierSchema("probs", (0, 1), logits=False)


class Answering:
    """A replica answering fixed class probabilities, after ``gate`` opens when it has one."""

    def __init__(
        self, name: str, probs: Sequence[float], gate: asyncio.Event | None = None
    ) -> None:
        self.name, self.tier = name, name.split("/")[0]
        self.probs = np.float32(probs)
        self.gate = gate
        self.up = True

    def ready(self) -> bool:
        return self.up

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self.gate is not None:
            await self.gate.wait()
        return {"probs": np.tile(self.probs, (len(feed["x"]), 1))}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def repository(name: str, *replicas: Answering, ensemble: str = "e") -> Repository:
    member = Member(name, X, OUT, SCHEMA, list(replicas))
    metadata = ModelMetadata(
        ensemble, ("1",), "ensemble", X, (TensorSpec("label", "INT64", (-1,)), OUT[0])
    )
    profiles = {"default": Profile.build("default", ProfileConfig())}
    model = EnsembleModel(ensemble, {name: member}, profiles, "default", (0, 1), metadata)
    return Repository([model], [member])


def request(model: str = "e") -> InferRequest:
    x = np.zeros((1, 2), np.float32)
    return InferRequest(model, None, [Tensor("x", "FP32", (1, 2), x)])


def test_a_request_runs_on_the_repository_it_started_with() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        old = repository("a", Answering("edge/0", [0.9, 0.1], gate))
        dispatcher = Dispatcher(old, GatewayMetrics())
        pending = asyncio.ensure_future(dispatcher.infer(request(), "http"))
        await asyncio.sleep(0)  # the request is in its member call now
        for _ in range(10):
            if old.members["a"].stats["edge/0"].outstanding:
                break
            await asyncio.sleep(0)
        # A reload swaps in a config whose only member is another one, on another tier.
        dispatcher.repository = repository("b", Answering("cloud/0", [0.1, 0.9]))
        gate.set()
        answer = await pending
        assert answer.parameters["members_answered"] == "a@edge"
        assert answer.outputs[0].data.tolist() == [0]
        # The next request sees the new config only.
        after = await dispatcher.infer(request(), "http")
        assert after.parameters["members_answered"] == "b@cloud"
        assert after.outputs[0].data.tolist() == [1]

    asyncio.run(main())


class Timed:
    """A replica answering fixed probabilities ``delay_s`` after each call, on ``clock``."""

    def __init__(self, name: str, probs: Sequence[float], delay_s: float, clock: Clock) -> None:
        self.name, self.tier = name, name.split("/")[0]
        self.probs, self.delay_s, self.clock = np.float32(probs), delay_s, clock

    def ready(self) -> bool:
        return True

    async def infer(
        self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        await self.clock.sleep(self.delay_s)
        return {"probs": np.tile(self.probs, (len(feed["x"]), 1))}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def test_a_deadline_answers_with_what_arrived_in_virtual_time() -> None:
    clock = VirtualClock()
    near = Member("near", X, OUT, SCHEMA, [Timed("edge/0", [0.9, 0.1], 0.005, clock)], clock=clock)
    far = Member("far", X, OUT, SCHEMA, [Timed("cloud/0", [0.1, 0.9], 0.100, clock)], clock=clock)
    metadata = ModelMetadata(
        "e", ("1",), "ensemble", X, (TensorSpec("label", "INT64", (-1,)), OUT[0])
    )
    profiles = {"default": Profile.build("default", ProfileConfig(), clock)}
    members = {"near": near, "far": far}
    model = EnsembleModel("e", members, profiles, "default", (0, 1), metadata)
    dispatcher = Dispatcher(Repository([model], [near, far]), GatewayMetrics(), clock=clock)
    x = np.zeros((1, 2), np.float32)
    timed = InferRequest(
        "e", None, [Tensor("x", "FP32", (1, 2), x)], parameters={"timeout": 20_000}
    )

    async def main() -> tuple[float, dict[str, object]]:
        answer = await clock.run(dispatcher.infer(timed, "http"))
        return clock.now(), dict(answer.parameters)

    took, params = asyncio.run(main())
    assert took == pytest.approx(0.020)  # the 20 ms deadline, to the tick of the virtual clock
    assert params["members_answered"] == "near@edge"
    assert params["deadline_met"] is False and params["violations"] == "deadline"


def test_a_replica_slow_once_gets_calls_again_once_its_latency_is_old() -> None:
    """p2c through a member's live stats, in virtual time: after one slow call a replica loses
    every draw to a fast one at low load, until its measurement has aged (10 s time constant)."""
    clock = VirtualClock()
    fast, slow = Answering("edge/0", [0.5, 0.5]), Answering("edge/1", [0.5, 0.5])
    member = Member("m", X, OUT, SCHEMA, [fast, slow], clock=clock)
    p2c: RoutingPolicy = registry.build("routing", "p2c", {}, RoutingPolicy)
    rng = random.Random(0)

    def served(replica: Answering, latency_s: float) -> None:
        member.observe(replica, member.attempt(replica), latency_s, "success")

    def firsts() -> set[str]:
        return {member.route(p2c, RoutingContext("m"), rng)[0].name for _ in range(20)}

    async def main() -> None:
        served(slow, 0.050)
        served(fast, 0.002)
        assert firsts() == {"edge/0"}
        await clock.advance(20.0)
        served(fast, 0.002)  # the fast one keeps serving
        assert firsts() == {"edge/0"}  # the slow one's 50 ms, 20 s old, weighs 6.8 ms
        await clock.advance(20.0)
        served(fast, 0.002)
        assert member.replica_view(slow).latency_age_s == 40.0
        assert firsts() == {"edge/1"}  # 40 s old: 0.9 ms against 2 ms, so it is tried again

    asyncio.run(main())


def test_model_config_follows_tritons_batching_rule() -> None:
    repo = repository("a", Answering("edge/0", [0.5, 0.5]))
    config = model_config(repo.get("e"), max_batch_size=64)
    assert config.max_batch_size == 64
    assert [(t.name, t.dims) for t in config.inputs] == [("x", (2,))]
    assert [(t.name, t.dims) for t in config.outputs] == [("label", ()), ("probs", (2,))]
    assert dict(config.parameters) == {"policy": "default", "members": "a"}
    # A model with a fixed first dimension does not batch: 0 and the full shapes.
    member = repo.members["a"]
    fixed_x = (TensorSpec("x", "FP32", (1, 2)),)
    member.metadata = ModelMetadata("a", ("1",), "onnxruntime_onnx", fixed_x, OUT)
    fixed = model_config(member, max_batch_size=64)
    assert fixed.max_batch_size == 0
    assert [t.dims for t in fixed.inputs] == [(1, 2)]


def test_the_repository_index_filters_unready_models_when_asked() -> None:
    replica = Answering("edge/0", [0.5, 0.5])
    repo = repository("a", replica)
    replica.up = False
    everything = repository_index(repo)
    assert [(e.name, e.state, e.reason) for e in everything] == [
        ("e", "UNAVAILABLE", "no ready replica"),
        ("a", "UNAVAILABLE", "no ready replica"),
    ]
    assert repository_index(repo, ready_only=True) == []
    replica.up = True
    assert [e.state for e in repository_index(repo, ready_only=True)] == ["READY", "READY"]


def test_a_cell_changes_only_by_transitions() -> None:
    cell = LocalCell(0)
    assert cell.apply(lambda n: (f"was {n}", n + 1)) == "was 0"
    cell.update(lambda n: n * 10)
    assert cell.get() == 10


def test_a_profiles_hedge_budgets_live_in_its_cell_one_per_member() -> None:
    hedging = {"name": "percentile", "params": {"budget": 0.5, "burst": 1.0}}
    profile = Profile.build("p", ProfileConfig.model_validate({"hedging": hedging}))
    assert profile.hedge_budget.get() == {}  # every member starts with a full burst
    assert profile.may_hedge("a") and profile.hedge_budget.get()["a"].tokens == 0.0
    assert not profile.may_hedge("a")  # spent
    assert profile.may_hedge("b")  # another member's budget is its own
    profile.first_attempt("a")
    profile.first_attempt("a")  # two primaries earn one hedge
    assert profile.may_hedge("a") and not profile.may_hedge("a")
    assert not profile.may_hedge("b")


def test_a_static_placement_never_changes() -> None:
    member = Member("a", X, OUT, SCHEMA, [Answering("cloud/0", [0.5, 0.5])])
    static = Static(member, "cloud")
    asyncio.run(static.scale(5))
    assert static.replicas() == 1 and not static.provisioned


def test_a_replica_set_grows_and_drains_only_what_it_added() -> None:
    async def main() -> None:
        member = Member("a", X, OUT, SCHEMA, [Answering("edge/0", [0.5, 0.5])])
        made: list[str] = []

        def make(name: str) -> Answering:
            made.append(name)
            return Answering(name, [0.5, 0.5])

        replicas = ReplicaSet(member, "edge", make, drain_timeout_s=1.0)
        await replicas.scale(3)
        assert made == ["edge/1", "edge/2"] and replicas.replicas() == 3
        assert replicas.added == ["edge/1", "edge/2"]
        await replicas.scale(0)  # never below the configured replica
        assert [r.name for r in member.serving("edge")] == ["edge/0"]
        await replicas.close()

    asyncio.run(main())


def test_a_replica_set_closes_what_it_started_after_a_reload_replaced_it() -> None:
    async def main() -> None:
        member = Member("a", X, OUT, SCHEMA, [Answering("edge/0", [0.5, 0.5])])
        replicas = ReplicaSet(member, "edge", lambda n: Answering(n, [0.5, 0.5]), 1.0)
        replicas.retired = True
        await replicas.scale(2)
        assert replicas.replicas() == 1 and replicas.added == []

    asyncio.run(main())


@pytest.mark.parametrize("target", [1, 2])
def test_keep_gives_a_new_replica_set_the_count_it_had(target: int) -> None:
    member = Member("a", X, OUT, SCHEMA, [Answering("edge/0", [0.5, 0.5])])
    replicas = ReplicaSet(member, "edge", lambda n: Answering(n, [0.5, 0.5]), 1.0)
    replicas.keep(target)
    assert replicas.replicas() == target
