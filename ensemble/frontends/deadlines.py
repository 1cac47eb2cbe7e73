"""Request bodies read within a time limit, every read of a frontend under one timer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class ReadDeadlines:
    """The body reads in progress on one frontend, each cut off ``timeout_s`` after it began.

    Every read has the same limit, so the reads in progress, kept in the order they began, are
    also in deadline order: one timer, armed for the oldest, serves them all. An
    ``asyncio.timeout`` per read (a timer handle and a context object each) cost 8 us of a
    request's 165 (`loadtest.app_cost`); a read here costs a dictionary entry. Reads that
    finish in time leave the timer alone: when it fires it cuts off the reads past their
    deadline and is armed again for the oldest left, if any.
    """

    __slots__ = ("_expired", "_loop", "_reads", "_timer", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._reads: dict[asyncio.Task[object], float] = {}
        """Each read's task and deadline, oldest first."""
        self._expired: set[asyncio.Task[object]] = set()
        """Tasks cancelled for their deadline whose reads have not ended yet."""
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def read(self, reading: Awaitable[T]) -> T:
        """What ``reading`` returns; TimeoutError once it has taken ``timeout_s``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a read with a deadline runs in a task")
        loop = task.get_loop()
        if loop is not self._loop:  # a new event loop: what the old one held is gone with it
            self._loop, self._timer = loop, None
            self._reads.clear()
            self._expired.clear()
        deadline = loop.time() + self.timeout_s
        self._reads[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        try:
            return await reading
        except asyncio.CancelledError:
            # Cut off here, and not also cancelled from elsewhere: the read timed out.
            if task in self._expired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._reads.pop(task, None)
            self._expired.discard(task)

    def _expire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer = None
        now = loop.time()
        reads = self._reads
        while reads:
            task, deadline = next(iter(reads.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire)
                return
            del reads[task]
            self._expired.add(task)
            task.cancel()
