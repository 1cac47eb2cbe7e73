"""The in-process engine: batching under concurrency, exact results, isolated failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.errors import InvalidInput
from ensemble.replicas.engine import InProcessEngine, SessionRunner
from ensemble.replicas.onnx import load_session, read_signature


def doubler(path: Path, batch: int | str = "N") -> SessionRunner:
    """y = 2 * x with x: FP32 [batch, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    session = load_session(path)
    return SessionRunner(session, read_signature(path, session))


class CountingRunner(SessionRunner):
    def __init__(self, base: SessionRunner) -> None:
        self.__dict__.update(base.__dict__)
        self.row_counts: list[int] = []

    def run(self, feed, outputs):  # type: ignore[no-untyped-def]
        self.row_counts.append(int(next(iter(feed.values())).shape[0]))
        return super().run(feed, outputs)


def rows(n: int, start: float) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3)}


def test_concurrent_calls_are_batched_and_split_back(tmp_path: Path) -> None:
    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(1)

    async def main() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(
            *(engine.submit(runner, rows(i % 3 + 1, 100.0 * i), ("y",)) for i in range(20))
        )

    results = asyncio.run(main())
    engine.shutdown()
    for i, result in enumerate(results):
        assert np.array_equal(result["y"], 2 * rows(i % 3 + 1, 100.0 * i)["x"])
    assert sum(runner.row_counts) == sum(i % 3 + 1 for i in range(20))
    assert len(runner.row_counts) < 20  # calls queued together ran together


def test_concurrent_calls_wait_one_iteration_for_the_next_tick_s_calls(tmp_path: Path) -> None:
    """Several calls of a session queued in one tick (concurrent requests) wait one more
    loop iteration, so calls queued in the next tick (requests read meanwhile) join their run;
    a lone call per session is dispatched at once."""
    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(1)

    async def main() -> None:
        first = [engine.submit(runner, rows(1, i), ("y",)) for i in range(2)]
        await asyncio.sleep(0)  # the next tick: more requests' calls
        assert engine.queued == 2  # still waiting
        later = engine.submit(runner, rows(1, 9.0), ("y",))
        await asyncio.gather(*first, later)
        assert runner.row_counts == [3]  # one run
        alone = engine.submit(runner, rows(1, 0.0), ("y",))
        await asyncio.sleep(0)
        assert engine.queued == 0  # dispatched: no wait for company
        await alone

    asyncio.run(main())
    engine.shutdown()


def test_each_run_of_an_owned_session_is_reported_with_its_calls(tmp_path: Path) -> None:
    from ensemble.metrics.gateway import GatewayMetrics

    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    runner.owner = ("doubler", "edge")
    metrics = GatewayMetrics()
    engine = InProcessEngine(1)
    engine.observe = metrics.record_run

    async def main() -> None:
        await asyncio.gather(*(engine.submit(runner, rows(1, i), ("y",)) for i in range(20)))

    asyncio.run(main())
    engine.shutdown()
    assert 1 <= metrics.member_runs[("doubler", "edge")] == len(runner.row_counts) < 20
    for stage in ("queue", "compute"):  # every call's wait, and the run it shared
        assert sum(metrics.member_stages[("doubler", "edge", stage)].counts) == 20


def test_batches_respect_max_rows(tmp_path: Path) -> None:
    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(1, max_batch_rows=4)

    async def main() -> None:
        await asyncio.gather(*(engine.submit(runner, rows(2, i), ("y",)) for i in range(10)))

    asyncio.run(main())
    engine.shutdown()
    assert max(runner.row_counts) <= 4 and sum(runner.row_counts) == 20


def test_batching_off_runs_each_call_alone(tmp_path: Path) -> None:
    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(2, batching=False)

    async def main() -> None:
        await asyncio.gather(*(engine.submit(runner, rows(1, i), ("y",)) for i in range(6)))

    asyncio.run(main())
    engine.shutdown()
    assert runner.row_counts == [1] * 6


def test_fixed_batch_models_are_never_merged(tmp_path: Path) -> None:
    runner = CountingRunner(doubler(tmp_path / "fixed.onnx", batch=1))
    assert not runner.batchable
    engine = InProcessEngine(1)

    async def main() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(engine.submit(runner, rows(1, i), ("y",)) for i in range(5)))

    results = asyncio.run(main())
    engine.shutdown()
    assert runner.row_counts == [1] * 5
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_bad_call_does_not_fail_its_batch_neighbours(tmp_path: Path) -> None:
    runner = doubler(tmp_path / "d.onnx")
    engine = InProcessEngine(1)

    async def main() -> list[object]:
        good = [engine.submit(runner, rows(1, i), ("y",)) for i in range(3)]
        bad = engine.submit(runner, {"x": np.zeros((1, 3), np.float64)}, ("y",))
        return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = asyncio.run(main())
    engine.shutdown()
    assert all(isinstance(r, dict) for r in good)
    assert isinstance(bad, InvalidInput)


def test_cancelled_call_is_skipped(tmp_path: Path) -> None:
    runner = CountingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(1)

    async def main() -> dict[str, np.ndarray]:
        doomed = engine.submit(runner, rows(5, 0), ("y",))
        kept = engine.submit(runner, rows(1, 0), ("y",))
        doomed.cancel()
        return await kept

    assert asyncio.run(main())["y"].shape == (1, 3)
    engine.shutdown()
    assert runner.row_counts == [1]


@pytest.mark.parametrize("threads", [1, 2])
def test_many_concurrent_calls_all_answer(tmp_path: Path, threads: int) -> None:
    runners = [doubler(tmp_path / f"m{i}.onnx") for i in range(3)]
    for r in runners:
        r.fixed_s = 5e-3  # make the work look big enough to spread over threads
    engine = InProcessEngine(threads)

    async def main() -> list[dict[str, np.ndarray]]:
        calls = [engine.submit(runners[i % 3], rows(1, i), ("y",)) for i in range(300)]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    engine.shutdown()
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(300)]


class ThreadRecordingRunner(SessionRunner):
    def __init__(self, base: SessionRunner) -> None:
        self.__dict__.update(base.__dict__)
        self.threads: list[str] = []

    def run(self, feed, outputs):  # type: ignore[no-untyped-def]
        import threading

        self.threads.append(threading.current_thread().name)
        return super().run(feed, outputs)


def test_tiny_work_of_a_timed_session_runs_on_the_loop_and_the_rest_on_the_pool(
    tmp_path: Path,
) -> None:
    """A hand-off to a pool thread costs more than a tiny run: once a session has timed
    LEARNED_RUNS runs, work estimated under INLINE_MAX_S stays on the event loop's thread;
    a session not timed yet, or work estimated larger, goes to the pool."""
    from ensemble.replicas.engine import INLINE_MAX_S, LEARNED_RUNS

    runner = ThreadRecordingRunner(doubler(tmp_path / "d.onnx"))
    engine = InProcessEngine(1)

    async def one() -> None:
        result = await engine.submit(runner, rows(1, 0.0), ("y",))
        assert np.array_equal(result["y"], 2 * rows(1, 0.0)["x"])

    async def main() -> None:
        for _ in range(LEARNED_RUNS):
            await one()
        assert all(name.startswith("onnxruntime") for name in runner.threads)
        runner.fixed_s, runner.per_row_s = INLINE_MAX_S / 4, 0.0
        await one()
        assert runner.threads[-1] == "MainThread"
        runner.fixed_s = INLINE_MAX_S * 2  # a bigger model: never on the loop
        await one()
        assert runner.threads[-1].startswith("onnxruntime")

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


class GatedRunner(ThreadRecordingRunner):
    """Holds its pool thread until ``release`` is set."""

    def __init__(self, base: SessionRunner) -> None:
        super().__init__(base)
        import threading

        self.release = threading.Event()

    def run(self, feed, outputs):  # type: ignore[no-untyped-def]
        assert self.release.wait(10)
        return super().run(feed, outputs)


def test_small_work_runs_on_the_loop_while_big_work_holds_the_pool(tmp_path: Path) -> None:
    """Small work of a timed session does not wait for a free thread, nor take one."""
    from ensemble.replicas.engine import INLINE_MAX_S, LEARNED_RUNS

    big = GatedRunner(doubler(tmp_path / "big.onnx"))
    small = ThreadRecordingRunner(doubler(tmp_path / "small.onnx"))
    engine = InProcessEngine(1)

    async def main() -> None:
        for _ in range(LEARNED_RUNS):
            await engine.submit(small, rows(1, 0.0), ("y",))
        small.fixed_s, small.per_row_s = INLINE_MAX_S / 4, 0.0
        big.fixed_s = INLINE_MAX_S * 2
        held = engine.submit(big, rows(1, 0.0), ("y",))
        await asyncio.sleep(0)  # the big call's dispatch: onto the one pool thread
        result = await asyncio.wait_for(engine.submit(small, rows(2, 5.0), ("y",)), 10)
        assert np.array_equal(result["y"], 2 * rows(2, 5.0)["x"])
        assert small.threads[-1] == "MainThread"
        assert not held.done()  # the pool's only thread was still busy with the big call
        big.release.set()
        assert np.array_equal((await held)["y"], 2 * rows(1, 0.0)["x"])
        assert len(big.threads) == 1 and big.threads[0].startswith("onnxruntime")

    try:
        asyncio.run(main())
    finally:
        big.release.set()
        engine.shutdown()


def test_a_batch_whose_callers_gave_up_while_it_waited_in_its_job_is_not_run(
    tmp_path: Path,
) -> None:
    """Two big batches share the pool's one thread in one job; the second's caller gives up
    (its deadline) while the first runs: the second never runs."""
    from ensemble.replicas.engine import INLINE_MAX_S

    first = GatedRunner(doubler(tmp_path / "first.onnx"))
    second = ThreadRecordingRunner(doubler(tmp_path / "second.onnx"))
    first.fixed_s = second.fixed_s = INLINE_MAX_S * 2
    engine = InProcessEngine(1)

    async def main() -> None:
        held = engine.submit(first, rows(1, 0.0), ("y",))
        doomed = engine.submit(second, rows(1, 0.0), ("y",))
        await asyncio.sleep(0)  # both dispatched, in one job on the one thread
        doomed.cancel()
        first.release.set()
        assert np.array_equal((await held)["y"], 2 * rows(1, 0.0)["x"])
        kept = await engine.submit(second, rows(2, 1.0), ("y",))  # the thread is free again
        assert np.array_equal(kept["y"], 2 * rows(2, 1.0)["x"])

    try:
        asyncio.run(main())
    finally:
        first.release.set()
        engine.shutdown()
    assert len(second.threads) == 1  # only the call that was still wanted ran
