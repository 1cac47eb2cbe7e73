"""Faults under load, without processes: the recovery rule on synthetic records, the replica
fault hooks against a fake replica, and the config template's placeholders."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ensemble.config import load_config
from loadtest import resilience
from loadtest.faults import (
    FaultContext,
    FaultEvent,
    KillReplicaParams,
    Mark,
    SlowReplicaParams,
    run_faults,
    validate_params,
)
from loadtest.recovery import Columns, RecoveryRule, analyse, recovery_s, threshold_ms
from loadtest.runner import Records

RULE = RecoveryRule(window=5, latency_factor=2.0, min_threshold_ms=10.0, baseline_from_s=1.0)


def timeline(*spans: tuple[float, float, str]) -> Records:
    """Requests every 0.1 s over each (from_s, to_s, what) span; what: `ok` (10 ms), `slow`
    (100 ms), `degraded` (5 ms, flagged), `error` (a 503)."""
    rec = Records()
    for start, end, what in spans:
        t = start
        while t < end - 1e-9:
            if what == "error":
                rec.add(t, 0.0, 0.001, rec.code("http_503"), 0, 0)
            else:
                latency = {"ok": 0.010, "slow": 0.100, "degraded": 0.005}[what]
                rec.add(t, 0.0, latency, 0, 0, 1, what == "degraded")
            t = round(t + 0.1, 6)
    return rec


def test_recovery_is_the_first_run_of_normal_answers_after_the_end() -> None:
    # Fault from 3 to 5 s; after it, 0.7 s of slow answers, one good one, more slow, then good.
    rec = timeline(
        (0, 3, "ok"), (3, 5, "degraded"), (5, 5.7, "slow"), (5.7, 5.8, "ok"),
        (5.8, 6.0, "slow"), (6.0, 8, "ok"),
    )  # fmt: skip
    cols = Columns.of(rec)
    assert recovery_s(cols, 5.0, 20.0, window=5) == pytest.approx(1.0)
    # One good answer is not a run of five; a window of one accepts it.
    assert recovery_s(cols, 5.0, 20.0, window=1) == pytest.approx(0.7)
    # A threshold above the slow answers' latency counts them as normal: recovered at once.
    assert recovery_s(cols, 5.0, 150.0, window=5) == pytest.approx(0.0)


def test_degraded_and_failed_answers_are_not_normal_and_no_run_means_none() -> None:
    rec = timeline((0, 3, "ok"), (3, 6, "degraded"), (6, 7, "error"), (7, 7.3, "ok"))
    cols = Columns.of(rec)
    assert recovery_s(cols, 3.0, 20.0, window=5) is None  # only three good ones after 7 s
    assert recovery_s(cols, 3.0, 20.0, window=3) == pytest.approx(4.0)


def test_records_out_of_send_order_are_sorted() -> None:
    rec = Records()
    for t in (0.4, 0.1, 0.3, 0.2, 0.0):  # as answers arrive, not as requests were sent
        rec.add(t, 0.0, 0.01, 0, 0, 1, t == 0.1)
    cols = Columns.of(rec)
    assert cols.intended.tolist() == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert cols.degraded.tolist() == [False, True, False, False, False]
    assert recovery_s(cols, 0.0, 20.0, window=3) == pytest.approx(0.2)


def test_threshold_is_a_multiple_of_the_baseline_p99_with_a_floor() -> None:
    assert threshold_ms(40.0, RULE) == 80.0
    assert threshold_ms(3.0, RULE) == 10.0
    assert threshold_ms(None, RULE) == 10.0


def test_analyse_counts_the_run_the_window_and_the_baseline() -> None:
    rec = timeline((0, 3, "ok"), (3, 4, "degraded"), (4, 4.5, "error"), (4.5, 8, "ok"))
    got = analyse(rec, 3.0, 4.5, RULE)
    run = got["run"]
    assert run["sent"] == 80 and run["answered"] == 75 and run["degraded"] == 10
    assert run["errors"] == {"http_503": 5}
    assert run["answered_share"] == pytest.approx(75 / 80)
    assert run["degraded_share"] == pytest.approx(10 / 80)
    window = got["window"]
    assert (window["start_s"], window["end_s"]) == (3.0, 4.5)
    assert window["sent"] == 15 and window["answered"] == 10 and window["degraded"] == 10
    assert window["latency_ms"]["p99"] == pytest.approx(5.0)
    # The baseline is 1-3 s: 20 answers of 10 ms, so the threshold is 2 x 10 ms.
    assert got["baseline"]["sent"] == 20 and got["threshold_ms"] == 20.0
    assert got["recovery_s"] == pytest.approx(0.0)
    assert got["after"]["sent"] == 35


def test_replica_hook_params() -> None:
    kill = validate_params("kill_replica", {"replica": "forest_a"})
    assert kill == KillReplicaParams(replica="forest_a", down_s=3.0, restart=True)
    slow = validate_params("slow_replica", {"replica": "b", "delay_ms": 200, "duration_s": 3})
    assert isinstance(slow, SlowReplicaParams) and slow.delay_ms == 200
    for name, params in (
        ("kill_replica", {"replica": ""}),
        ("kill_replica", {"replica": "a", "down_s": -1}),
        ("kill_replica", {"replica": "a", "pid": 1}),  # no way to name a process by pid
        ("slow_replica", {"replica": "a", "delay_ms": 0, "duration_s": 1}),
        ("slow_replica", {"replica": "a", "delay_ms": 10}),
    ):
        with pytest.raises(ValidationError):
            validate_params(name, params)


class FakeReplica:
    """Records what the hooks do to it."""

    def __init__(self, name: str, start_s: float = 0.0) -> None:
        self.name = name
        self.calls: list[str] = []
        self.running = True
        self.start_s = start_s

    def kill(self) -> int:
        self.calls.append("kill")
        self.running = False
        return 4242

    async def restart(self) -> None:
        self.calls.append("restart")
        # Like ReplicaProcess: a cancelled start still completes before the cancel goes on.
        start = asyncio.ensure_future(asyncio.sleep(self.start_s))
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:
            await start
            self.running = True
            raise
        self.running = True

    def set_delay_ms(self, delay_ms: float) -> None:
        self.calls.append(f"delay {delay_ms:g}")


def run_hooks(events: list[FaultEvent], replicas: dict[str, FakeReplica]) -> list[Mark]:
    async def go() -> list[Mark]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        ctx = FaultContext(None, elapsed=lambda: loop.time() - start, replicas=dict(replicas))

        async def sleep_until(at_s: float) -> None:
            await asyncio.sleep(max(0.0, start + at_s - loop.time()))

        await run_faults(events, ctx, sleep_until)
        return ctx.marks

    return asyncio.run(go())


def test_kill_replica_kills_waits_and_restarts() -> None:
    replica = FakeReplica("forest_a")
    params = validate_params("kill_replica", {"replica": "forest_a", "down_s": 0.01})
    marks = run_hooks([FaultEvent(0.0, "kill_replica", params)], {"forest_a": replica})
    assert replica.calls == ["kill", "restart"]
    assert [m.message for m in marks] == [
        "replica forest_a killed (SIGKILL, pid 4242)",
        "replica forest_a restarting",
        "replica forest_a ready again",
    ]
    assert resilience.window_of(marks, "kill_replica") == (marks[0].at_s, marks[2].at_s)


def test_a_restart_the_run_end_cancels_still_says_when_the_replica_was_back() -> None:
    replica = FakeReplica("forest_a", start_s=0.3)
    params = validate_params("kill_replica", {"replica": "forest_a", "down_s": 0.01})

    async def go() -> list[Mark]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        replicas = {"forest_a": replica}
        ctx = FaultContext(None, elapsed=lambda: loop.time() - start, replicas=replicas)
        task = asyncio.ensure_future(
            run_faults([FaultEvent(0.0, "kill_replica", params)], ctx, asyncio.sleep)
        )
        await asyncio.sleep(0.1)  # the load ends while the replica is starting again
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ctx.marks

    marks = asyncio.run(go())
    assert replica.running
    assert [m.message for m in marks][-1] == "replica forest_a ready again"
    assert marks[-1].at_s >= 0.3


def test_kill_without_restart_and_slow_replica_undoes_its_delay() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    kill = validate_params("kill_replica", {"replica": "a", "restart": False})
    slow = validate_params("slow_replica", {"replica": "b", "delay_ms": 200, "duration_s": 0.01})
    run_hooks([FaultEvent(0.0, "kill_replica", kill), FaultEvent(0.0, "slow_replica", slow)],
              {"a": a, "b": b})  # fmt: skip
    assert a.calls == ["kill"]
    assert b.calls == ["delay 200", "delay 0"]


def test_a_replica_the_harness_did_not_start_is_a_failed_fault() -> None:
    params = validate_params("kill_replica", {"replica": "someone_else"})
    marks = run_hooks([FaultEvent(0.0, "kill_replica", params)], {"forest_a": FakeReplica("x")})
    assert len(marks) == 1 and marks[0].message.startswith("failed: no replica 'someone_else'")
    assert resilience.window_of(marks, "kill_replica") is None


def test_the_shipped_template_fills_into_a_valid_config(tmp_path: Path) -> None:
    template = resilience.DEFAULT_CONFIG
    doc = yaml.safe_load(template.read_text())
    found = resilience.placeholders(doc, template.parent)
    assert set(found) == {"forest_a", "forest_b", "logreg_a"}
    assert found["forest_a"] == ((template.parent / "../../models/digits/forest.onnx").resolve(),
                                 "oip-http")  # fmt: skip
    endpoints = {name: f"http://127.0.0.1:{9000 + i}" for i, name in enumerate(sorted(found))}
    filled = resilience.fill(doc, template.parent, endpoints)
    path = tmp_path / "elsewhere" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(filled))
    cfg = load_config(path)  # absolute paths: valid wherever it is written
    forest = next(m for m in cfg.ensembles[0].members if m.name == "forest")
    assert forest.placement[0].endpoints == ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
    assert cfg.tiers["cloud"].link.emulate
    assert all(Path(m["model"]).is_absolute() for m in filled["ensembles"][0]["members"])


def test_fault_events_and_arguments() -> None:
    settings = resilience.parse_args(["--faults", "kill,slow", "--at", "4", "--fault", "2"])
    assert settings.faults == ("kill", "slow")
    assert resilience.fault_event(settings, "kill") == {
        "at_s": 4.0,
        "name": "kill_replica",
        "params": {"replica": "forest_a", "down_s": 2.0},
    }
    slow = resilience.fault_event(settings, "slow")
    assert slow["params"] == {"replica": "forest_b", "delay_ms": 200.0, "duration_s": 2.0}
    assert resilience.fault_event(settings, "partition")["params"]["tier"] == "cloud"
    with pytest.raises(SystemExit):
        resilience.parse_args(["--at", "20", "--duration", "15"])
