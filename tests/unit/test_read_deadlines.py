"""Body reads cut off at their frontend's time limit, all under one timer."""

from __future__ import annotations

import asyncio

import pytest

from ensemble.frontends.deadlines import ReadDeadlines


async def never() -> None:
    await asyncio.Event().wait()


async def soon(value: int) -> int:
    await asyncio.sleep(0)
    return value


def test_reads_finish_in_time_or_are_cut_off_oldest_first() -> None:
    deadlines = ReadDeadlines(0.05)

    async def scenario() -> None:
        assert await deadlines.read(soon(1)) == 1  # in time: the timer keeps running, idle
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(deadlines.read(never()))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(deadlines.read(never()))
        quick = asyncio.ensure_future(deadlines.read(soon(2)))
        with pytest.raises(TimeoutError):
            await first
        cut_first = loop.time() - started
        assert not second.done() and await quick == 2  # not yet due; finished in time
        with pytest.raises(TimeoutError):
            await second  # the timer was armed again, for it
        assert 0.05 <= cut_first < 0.07 + 0.5  # (a busy machine is late, never early)
        assert loop.time() - started >= 0.07
        assert not deadlines._reads and not deadlines._expired  # nothing left behind

    asyncio.run(scenario())


def test_a_read_cancelled_from_elsewhere_is_cancelled_not_timed_out() -> None:
    deadlines = ReadDeadlines(10.0)

    async def scenario() -> None:
        reading = asyncio.ensure_future(deadlines.read(never()))
        await asyncio.sleep(0)
        reading.cancel()  # the client went away, or the server stops
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(scenario())


def test_a_read_cut_off_and_cancelled_from_elsewhere_stays_cancelled() -> None:
    deadlines = ReadDeadlines(0.01)

    async def scenario() -> None:
        reading = asyncio.ensure_future(deadlines.read(never()))
        await asyncio.sleep(0)

        def both() -> None:
            deadlines._expire()  # pretend its deadline passed ...
            reading.cancel()  # ... as the server cancelled it too

        deadlines._reads[next(iter(deadlines._reads))] = 0.0
        asyncio.get_running_loop().call_soon(both)
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(scenario())


def test_a_frontend_outlives_its_event_loop() -> None:
    """A new loop (a test's second asyncio.run) gets a timer of its own."""
    deadlines = ReadDeadlines(0.01)

    async def cut() -> None:
        with pytest.raises(TimeoutError):
            await deadlines.read(never())

    async def left_pending() -> None:
        pending = asyncio.ensure_future(deadlines.read(never()))
        await asyncio.sleep(0)  # the loop closes with its timer armed (and the read cancelled)
        assert not pending.done()

    asyncio.run(left_pending())
    asyncio.run(cut())
