"""The ray backend without Ray: config rules for `ray` placements, deployment naming, the replica's
error mapping and cancellation with a fake handle, and the runtime refusing changed deployments.
tests/integration/test_ray_backend.py and test_ray_cluster.py run the real thing."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensemble.clock import SYSTEM_CLOCK
from ensemble.config import GatewayConfig, MemberConfig, Placement, parse_yaml
from ensemble.control.ray_runtime import (
    OnnxDeployment,
    RayRuntime,
    RaySpec,
    deployment_name,
    is_loopback,
    ray_specs,
)
from ensemble.control.reload import _check_restart_only
from ensemble.errors import (
    ConfigError,
    DeadlineExceeded,
    EnsembleError,
    InvalidInput,
    MemberFailed,
    ModelIntegrityError,
)
from ensemble.replicas.ray import RayReplica
from ensemble.replicas.remote import HealthCheck
from ensemble.scope import request_scope
from ensemble.types import TensorSpec

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))
FEED = {"input": np.zeros((1, 64), np.float32)}


def config(placement: str, extra: str = "") -> GatewayConfig:
    return parse_yaml(
        f"""
ensembles:
  - name: e
    members:
      - name: m
        model: {ZOO / "logreg.onnx"}
        placement: {placement}
{extra}
""",
        source="test.yaml",
        base_dir=ZOO,
    )


def errors(placement: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        config(placement, extra)
    return str(info.value)


def test_ray_placement_defaults_and_sizing() -> None:
    cfg = config("[{tier: cloud, backend: ray, replicas: {min: 2, max: 3}, ray: {num_cpus: 0.5}}]")
    place = cfg.ensembles[0].members[0].placement[0]
    assert place.networked and not place.remote
    assert place.ray is not None and place.ray.num_cpus == 0.5
    assert place.ray.max_ongoing_requests == 64
    assert cfg.ray.app == "ensemble" and cfg.ray.gateway_tier is None


def test_ray_placement_rules() -> None:
    assert "endpoints" in errors("[{tier: cloud, backend: ray, endpoints: ['h:1']}]")
    assert "only for the ray backend" in errors("[{tier: edge, ray: {num_cpus: 1}}]")
    # A tier may start scaled to zero only while another one keeps the member up.
    assert "keep at least one replica" in errors(
        "[{tier: cloud, backend: ray, replicas: {min: 0}}]"
    )
    config("[{tier: edge}, {tier: cloud, backend: ray, replicas: {min: 0, max: 2}}]")
    assert "timeout_s" in errors("[{tier: edge, timeout_s: 2}]")
    assert "num_cpus" in errors("[{tier: cloud, backend: ray, ray: {num_cpus: 0}}]")
    assert "unknown tier 'moon'" in errors("[{tier: edge}]", "ray: {gateway_tier: moon}")


def test_replica_names_number_each_tier_across_placements() -> None:
    member = MemberConfig(
        name="m",
        model=Path("m.onnx"),
        placement=[
            Placement(tier="edge", replicas={"min": 2, "max": 2}),
            Placement(tier="cloud", backend="ray", replicas={"min": 3, "max": 3}),
            Placement(tier="edge", backend="oip-http", endpoints=["http://127.0.0.1:1"]),
            Placement(tier="cloud", backend="ray"),
        ],
    )
    assert member.replica_names() == [
        ["edge/0", "edge/1"],
        ["cloud/0"],  # one per deployment: Ray Serve balances its own replicas
        ["edge/2"],
        ["cloud/1"],
    ]
    assert deployment_name("m", "cloud/1") == "m-cloud-1"


def test_specs_name_each_deployment_and_pin_the_model_bytes() -> None:
    cfg = config("[{tier: edge}, {tier: cloud, backend: ray, replicas: {min: 2, max: 2}}]")
    (spec,) = ray_specs(cfg).values()
    assert (spec.deployment, spec.member, spec.tier, spec.num_replicas) == (
        "m-cloud-0",
        "m",
        "cloud",
        2,
    )
    assert len(spec.digest) == 64 and spec.model == ZOO / "logreg.onnx"


def test_each_served_version_on_ray_is_a_deployment_of_its_own() -> None:
    def specs(loaded: str) -> dict[str, RaySpec]:
        text = f"""
ensembles:
  - name: e
    members:
      - name: m
        model: {ZOO / "logreg.onnx"}
        placement: [{{tier: cloud, backend: ray}}]
        versions: [{{version: "2", model: {ZOO / "mlp_small.onnx"}}}]
        default_version: "1"
        loaded_versions: {loaded}
"""
        return ray_specs(parse_yaml(text, source="t.yaml", base_dir=ZOO))

    both = specs('["1", "2"]')
    assert sorted(both) == ["m-cloud-0", "m-v2-cloud-0"]
    assert both["m-v2-cloud-0"].model == ZOO / "mlp_small.onnx"
    assert both["m-v2-cloud-0"].digest != both["m-cloud-0"].digest
    assert sorted(specs('["1"]')) == ["m-cloud-0"]  # an unloaded version is not deployed


def test_runtime_refuses_deployments_it_did_not_make() -> None:
    cfg = config("[{tier: cloud, backend: ray}]")
    specs = ray_specs(cfg)
    runtime = RayRuntime("ensemble", specs, {"m-cloud-0": "handle"}, owns_ray=False)
    (spec,) = specs.values()
    assert runtime.handle(spec) == "handle"
    bigger = RaySpec(**{**spec.__dict__, "num_replicas": 4})
    with pytest.raises(EnsembleError, match=r"m-cloud-0 changed.*restart the gateway"):
        runtime.handle(bigger)
    other = RaySpec(**{**spec.__dict__, "deployment": "n-cloud-0"})
    with pytest.raises(EnsembleError, match="n-cloud-0 is new"):
        runtime.handle(other)


def test_a_changed_ray_section_needs_a_restart() -> None:
    old = config("[{tier: edge}]")
    new = config("[{tier: edge}]", "ray: {app: other}")
    with pytest.raises(ConfigError, match=r"ray.app: 'ensemble' -> 'other' needs a restart"):
        _check_restart_only(old, new)


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1:6379") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    assert not is_loopback("10.0.0.5:6379")


def test_the_deployment_class_runs_the_model_from_bytes() -> None:
    model = (ZOO / "logreg.onnx").read_bytes()
    deployment = OnnxDeployment("logreg", model, hashlib.sha256(model).hexdigest())
    feed = {"input": np.full((2, 64), 8.0, np.float32)}
    out = asyncio.run(deployment(feed, ["probabilities", "label"]))
    assert out["probabilities"].shape == (2, 10) and out["label"].shape == (2,)
    assert deployment.ready()
    with pytest.raises(InvalidInput):
        asyncio.run(deployment({"input": np.zeros((1, 63), np.float32)}, ["label"]))


class Ticks:
    """A clock that reads ``readings`` in turn: a call's arrival, then its start on a thread."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


@pytest.mark.parametrize(
    ("left_s", "waited_s", "runs"),
    [(None, 60.0, True), (0.5, 0.4, True), (0.5, 0.5, False), (0.0, 0.0, False)],
)
def test_the_deployment_skips_a_call_whose_time_ran_out_while_it_waited(
    left_s: float | None, waited_s: float, runs: bool
) -> None:
    model = (ZOO / "logreg.onnx").read_bytes()
    clock = Ticks(100.0, 100.0 + waited_s)
    deployment = OnnxDeployment("logreg", model, hashlib.sha256(model).hexdigest(), clock)
    feed = {"input": np.full((1, 64), 8.0, np.float32)}
    call = deployment(feed, ["label"], time_left_s=left_s)
    if runs:
        assert asyncio.run(call)["label"].shape == (1,)
    else:
        with pytest.raises(DeadlineExceeded, match=r"time ran out .* skipped"):
            asyncio.run(call)


def test_a_ray_request_carries_the_time_left_to_its_calls_latest_deadline() -> None:
    async def main() -> list[float | None]:
        handle = EchoHandle()
        r = replica(handle)  # type: ignore[arg-type]
        await r.start()
        try:
            with request_scope(SYSTEM_CLOCK.now() + 1.0, 0, SYSTEM_CLOCK):
                alone = asyncio.ensure_future(r.infer(rows(0.5)))
            await asyncio.sleep(0)  # it leaves alone
            # Tasks made inside each request's scope, as the gateway makes its calls.
            with request_scope(SYSTEM_CLOCK.now() + 2.0, 0, SYSTEM_CLOCK):
                soon = asyncio.ensure_future(r.infer(rows(0.25)))
            with request_scope(SYSTEM_CLOCK.now() + 5.0, 0, SYSTEM_CLOCK):
                later = asyncio.ensure_future(r.infer(rows(0.25)))
            await asyncio.gather(alone, soon, later)
            await r.infer(rows(0.1))  # outside a request: no deadline
        finally:
            await r.close()
        return handle.time_left

    first, together, none = asyncio.run(main())
    # The time left when each Ray request left (a replica counts it on its own clock).
    assert first == pytest.approx(1.0, abs=0.2)
    assert together == pytest.approx(5.0, abs=0.2)  # the batch's latest
    assert none is None


def test_the_deployment_class_refuses_bytes_that_are_not_the_checked_ones() -> None:
    checked = hashlib.sha256((ZOO / "logreg.onnx").read_bytes()).hexdigest()
    other = (ZOO / "mlp_small.onnx").read_bytes()
    with pytest.raises(ModelIntegrityError, match=f"expects {checked}"):
        OnnxDeployment("logreg", other, checked)


def test_specs_check_the_model_file_against_its_card(tmp_path: Path) -> None:
    for name in ("logreg.onnx", "logreg.card.json"):
        shutil.copy(ZOO / name, tmp_path / name)
    shutil.copy(ZOO / "mlp_small.onnx", tmp_path / "logreg.onnx")  # same inputs and outputs
    cfg = parse_yaml(
        "ensembles: [{name: e, members: [{name: m, model: logreg.onnx, "
        "placement: [{tier: edge}, {tier: cloud, backend: ray}]}]}]",
        source="test.yaml",
        base_dir=tmp_path,
    )
    with pytest.raises(ModelIntegrityError) as info:
        ray_specs(cfg)
    assert info.value.members == ["m"]
    assert f"its card {tmp_path / 'logreg.card.json'} expects" in str(info.value)


class TaskError(Exception):
    """Like ray.exceptions.RayTaskError: the replica's exception as ``cause``."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Response:
    def __init__(self, result: Any, delay_s: float = 0.0) -> None:
        self.result, self.delay_s, self.cancelled = result, delay_s, False

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.delay_s)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    def __init__(self, response: Response) -> None:
        self.response = response

    def remote(self) -> Response:
        return self.response


class Handle:
    """A fake DeploymentHandle: ``remote`` gives queued responses, ``ready.remote`` one."""

    def __init__(self, *answers: Response, ready: Response | None = None) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[Any, ...]] = []
        self.ready = Method(ready or Response(True))

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        self.calls.append((*args, kwargs))
        return self.answers.pop(0)


def replica(handle: Handle, timeout_s: float = 5.0) -> RayReplica:
    cfg = config("[{tier: cloud, backend: ray}]")
    (spec,) = ray_specs(cfg).values()
    return RayReplica(
        "cloud/0",
        "cloud",
        handle,
        "ensemble",
        spec.deployment,
        spec.member,
        OUTPUTS,
        timeout_s=timeout_s,
        health=HealthCheck(interval_s=0.01, timeout_s=0.5),
    )


def test_calls_pass_the_feed_and_the_outputs() -> None:
    async def main() -> None:
        probs = np.full((1, 10), 0.1, np.float32)
        handle = Handle(Response({"probabilities": probs}))
        r = replica(handle)
        await r.start()
        try:
            assert r.ready() and "ray://ensemble/m-cloud-0" in str(r)
            out = await r.infer(FEED, ["probabilities"])
            assert out["probabilities"] is probs
            # No request: no time limit.
            assert handle.calls == [(FEED, ["probabilities"], {"time_left_s": None})]
        finally:
            await r.close()

    asyncio.run(main())


def test_errors_are_mapped_to_the_gateways() -> None:
    async def main() -> None:
        handle = Handle(
            Response(TaskError(InvalidInput("bad pixels"))),
            Response(TaskError(EnsembleError("onnxruntime failed: boom"))),
            Response(RuntimeError("actor died")),
            Response({"label": np.zeros(1, np.float32)}),  # the wrong datatype for label
        )
        r = replica(handle)
        await r.start()
        try:
            with pytest.raises(InvalidInput, match="rejected the input: bad pixels"):
                await r.infer(FEED)
            with pytest.raises(MemberFailed, match="failed: onnxruntime failed: boom"):
                await r.infer(FEED)
            with pytest.raises(MemberFailed, match="RuntimeError: actor died"):
                await r.infer(FEED)
            with pytest.raises(MemberFailed, match="same model"):
                await r.infer(FEED, ["label"])
        finally:
            await r.close()

    asyncio.run(main())


def test_timeouts_and_cancellation_cancel_the_ray_request() -> None:
    async def main() -> None:
        slow = Response({"label": np.zeros(1, np.int64)}, delay_s=10)
        r = replica(Handle(slow), timeout_s=0.05)
        await r.start()
        try:
            with pytest.raises(MemberFailed, match=r"did not answer within 0\.05 s"):
                await r.infer(FEED, ["label"])
            await asyncio.sleep(0)  # the abandoned request is cancelled on the next turn
            assert slow.cancelled
        finally:
            await r.close()

    asyncio.run(main())


def test_a_failing_ready_check_makes_the_replica_unready() -> None:
    async def main() -> None:
        r = replica(Handle(ready=Response(RuntimeError("gone"))))
        await r.start()
        try:
            assert not r.ready() and r.last_check_error == "RuntimeError: gone"
        finally:
            await r.close()

    asyncio.run(main())


class EchoHandle:
    """A fake deployment answering `probabilities` = the first 10 input columns and `label` =
    their argmax, after ``delay_s``; rows whose first pixel is negative are invalid input."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.requests: list[int] = []
        self.time_left: list[float | None] = []
        self.ready = Method(Response(True))
        self.responses: list[Response] = []

    def remote(
        self,
        feed: dict[str, np.ndarray],
        outputs: list[str],
        *,
        time_left_s: float | None = None,
    ) -> Response:
        x = feed["input"]
        self.requests.append(len(x))
        self.time_left.append(time_left_s)
        if (x[:, 0] < 0).any():
            answer: Any = TaskError(InvalidInput("negative pixels"))
        else:
            probs = x[:, :10].astype(np.float32)
            answer = {"probabilities": probs, "label": probs.argmax(axis=1).astype(np.int64)}
        response = Response(answer, self.delay_s)
        self.responses.append(response)
        return response


def rows(*values: float) -> dict[str, np.ndarray]:
    x = np.zeros((len(values), 64), np.float32)
    x[:, 0] = values
    x[:, 3] = 1.0
    return {"input": x}


def test_concurrent_calls_share_one_ray_request_and_get_their_own_rows() -> None:
    async def main() -> None:
        handle = EchoHandle()
        r = replica(handle)  # type: ignore[arg-type]
        await r.start()
        try:
            first = asyncio.ensure_future(r.infer(rows(0.5)))
            await asyncio.sleep(0)  # the first call leaves alone: nothing else is waiting
            rest = [r.infer(rows(0.25 * k, 0.1)) for k in range(1, 4)]
            answers = await asyncio.gather(first, *rest)
            assert handle.requests == [1, 6]  # then the three calls went together
            assert r.requests_sent == 2
            assert answers[0]["probabilities"].shape == (1, 10)
            for k, answer in enumerate(answers[1:], 1):
                assert answer["probabilities"][:, 0].tolist() == [0.25 * k, np.float32(0.1)]
                assert answer["label"].shape == (2,)
        finally:
            await r.close()

    asyncio.run(main())


def test_a_bad_input_in_a_batch_fails_only_its_own_call() -> None:
    async def main() -> None:
        handle = EchoHandle()
        r = replica(handle)  # type: ignore[arg-type]
        await r.start()
        try:
            blocker = asyncio.ensure_future(r.infer(rows(0.5)))
            await asyncio.sleep(0)
            good = asyncio.ensure_future(r.infer(rows(0.7)))
            bad = asyncio.ensure_future(r.infer(rows(-1.0)))
            await blocker
            assert (await good)["probabilities"][0, 0] == np.float32(0.7)
            with pytest.raises(InvalidInput, match="negative pixels"):
                await bad
            assert handle.requests == [1, 2, 1, 1]  # the batch, then each call on its own
        finally:
            await r.close()

    asyncio.run(main())


def test_a_batch_nobody_waits_for_is_cancelled_and_closing_fails_waiting_calls() -> None:
    async def main() -> None:
        handle = EchoHandle(delay_s=10)
        r = replica(handle, timeout_s=0.05)  # type: ignore[arg-type]
        await r.start()
        try:
            with pytest.raises(MemberFailed, match="did not answer"):
                await r.infer(rows(0.5))
            await asyncio.sleep(0)  # the abandoned request is cancelled on the next turn
            assert handle.responses[0].cancelled
            waiting = asyncio.ensure_future(r.infer(rows(0.5)))
            await asyncio.sleep(0.01)
        finally:
            await r.close()
        with pytest.raises(MemberFailed, match="closed"):
            await waiting

    asyncio.run(main())


def test_calls_that_cannot_stack_go_apart() -> None:
    async def main() -> None:
        handle = EchoHandle()
        r = replica(handle)  # type: ignore[arg-type]
        r.batchable = False
        await r.start()
        try:
            await asyncio.gather(*(r.infer(rows(0.1 * k)) for k in range(3)))
            assert handle.requests == [1, 1, 1]
        finally:
            await r.close()

    asyncio.run(main())


class _Context:
    """What Serve's controller hands a custom autoscaling policy (the fields it reads)."""

    def __init__(self, target: int, queued: float) -> None:
        self.app_name, self.deployment_name = "app", "m-cloud-0"
        self.target_num_replicas, self.total_num_requests = target, queued
        self.policy_state: dict[str, object] = {}


def test_follow_gateway_applies_the_control_loops_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.experimental import internal_kv

    from ensemble.control import ray_runtime

    store: dict[tuple[bytes, str | None], bytes] = {}
    monkeypatch.setattr(
        internal_kv,
        "_internal_kv_put",
        lambda key, value, overwrite, namespace: store.__setitem__((key, namespace), value),
    )
    monkeypatch.setattr(
        internal_kv, "_internal_kv_get", lambda key, namespace: store.get((key, namespace))
    )
    assert ray_runtime.follow_gateway(_Context(2, 0))[0] == 2  # nothing set: keep Serve's count
    ray_runtime.set_target("app", "m-cloud-0", 3)
    assert ray_runtime.follow_gateway(_Context(2, 0))[0] == 3
    ray_runtime.set_target("app", "m-cloud-0", 0)
    assert ray_runtime.follow_gateway(_Context(1, 0))[0] == 0
    # A call waiting at zero replicas starts one (Serve's own cold start).
    assert ray_runtime.follow_gateway(_Context(0, 1))[0] == 1
