"""The clocks: the virtual one fires sleeps and timers in deadline order only as a test moves
time; the system one is the event loop's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from ensemble.clock import SYSTEM_CLOCK, Clock, VirtualClock


def test_timers_fire_in_deadline_order_each_at_its_deadline() -> None:
    async def main() -> list[tuple[str, float]]:
        clock = VirtualClock(start=100.0)
        fired: list[tuple[str, float]] = []

        def fire(name: str) -> Callable[[], None]:
            return lambda: fired.append((name, clock.now()))

        for name, delay_s in (("c", 0.3), ("a", 0.1), ("b", 0.2), ("b2", 0.2)):
            clock.call_later(delay_s, fire(name))
        await clock.advance(0.15)
        assert fired == [("a", 100.1)] and clock.now() == 100.15
        await clock.advance(1.0)
        return fired

    # Equal deadlines fire in the order they were set.
    assert asyncio.run(main()) == [("a", 100.1), ("b", 100.2), ("b2", 100.2), ("c", 100.3)]


def test_a_cancelled_timer_never_fires() -> None:
    async def main() -> None:
        clock = VirtualClock()
        fired: list[str] = []
        timer = clock.call_later(0.1, lambda: fired.append("x"))
        clock.call_later(0.2, lambda: fired.append("y"))
        timer.cancel()
        assert clock.next_deadline() == 0.2
        await clock.advance(1.0)
        assert fired == ["y"] and clock.next_deadline() is None

    asyncio.run(main())


def test_sleepers_wake_at_their_deadlines_and_what_they_start_runs_in_the_same_advance() -> None:
    async def main() -> None:
        clock = VirtualClock()
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, *delays_s: float) -> None:
            for delay_s in delays_s:
                await clock.sleep(delay_s)
                woke.append((name, clock.now()))

        tasks = [
            asyncio.ensure_future(sleeper("chain", 0.1, 0.1, 0.1)),
            asyncio.ensure_future(sleeper("once", 0.25)),
        ]
        await clock.advance(0.2)
        assert woke == [("chain", 0.1), ("chain", 0.2)]
        await clock.advance(0.2)
        assert woke[2:] == [("once", 0.25), ("chain", pytest.approx(0.3))]
        assert all(task.done() for task in tasks)

    asyncio.run(main())


def test_a_cancelled_sleep_leaves_no_timer() -> None:
    async def main() -> None:
        clock = VirtualClock()
        task = asyncio.ensure_future(clock.sleep(5.0))
        await clock.advance(1.0)
        assert clock.next_deadline() == 5.0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock.next_deadline() is None

    asyncio.run(main())


def test_nothing_due_now_needs_time_to_move() -> None:
    async def main() -> None:
        clock = VirtualClock()
        fired: list[str] = []
        clock.call_later(0, lambda: fired.append("now"))
        await clock.sleep(0)
        await clock.sleep(-1.0)
        await asyncio.sleep(0)
        assert fired == ["now"] and clock.now() == 0.0

    asyncio.run(main())


def test_step_jumps_to_the_next_deadline() -> None:
    async def main() -> None:
        clock = VirtualClock()
        assert not await clock.step()
        clock.call_later(2.5, lambda: None)
        clock.call_later(4.0, lambda: None)
        assert await clock.step() and clock.now() == 2.5
        assert await clock.step() and clock.now() == 4.0
        assert not await clock.step() and clock.now() == 4.0
        with pytest.raises(ValueError, match="only moves forward"):
            await clock.advance(-0.1)

    asyncio.run(main())


def test_run_drives_a_scenario_to_its_end_and_refuses_to_hang() -> None:
    async def main() -> None:
        clock = VirtualClock()

        async def slow_sum() -> int:
            await clock.sleep(10.0)
            await clock.sleep(20.0)
            return 3

        assert await clock.run(slow_sum()) == 3 and clock.now() == 30.0
        with pytest.raises(RuntimeError, match="waits nothing the virtual clock will fire"):
            await clock.run(asyncio.Event().wait())
        with pytest.raises(
            RuntimeError, match=r"not done at virtual time 30\.0: waits until 130\.0"
        ):
            await clock.run(clock.sleep(100.0), within_s=50.0)
        assert clock.now() == 30.0  # it stopped before jumping past its limit

    asyncio.run(main())


def test_the_system_clock_is_the_event_loops() -> None:
    async def main() -> None:
        clock: Clock = SYSTEM_CLOCK
        fired = asyncio.Event()
        before = clock.now()
        clock.call_later(0, fired.set)
        cancelled = clock.call_later(0, lambda: pytest.fail("a cancelled timer ran"))
        cancelled.cancel()
        await clock.sleep(0)
        await asyncio.wait_for(fired.wait(), 1)
        assert clock.now() >= before

    asyncio.run(main())
