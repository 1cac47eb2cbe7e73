"""The admission gate's running count, one process's or all workers' together.

Each worker writes only its own cell of a shared array and reads the sum: no lock to hold, so a
worker that dies at any moment leaves nothing locked (the supervisor zeroes its cell when it
reaps it). Two workers that read the sum in the same instant may both take the last slot: the
global count can exceed the limit by at most (workers - 1) for as long as those requests run.
"""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any, Protocol


class Slots(Protocol):
    """The running count the admission gate compares with its limit."""

    mine: int
    """Requests running in this process."""
    shared: bool
    """Other processes free slots too (a gate with waiters looks for them now and then)."""

    def total(self) -> int: ...

    def add(self, delta: int) -> None: ...


class LocalSlots:
    """Requests running in this process (one gateway process)."""

    __slots__ = ("mine",)
    shared = False

    def __init__(self) -> None:
        self.mine = 0

    def total(self) -> int:
        return self.mine

    def add(self, delta: int) -> None:
        self.mine += delta


class SharedSlots:
    """Requests running in every worker: cell ``index`` of ``array`` is this worker's."""

    __slots__ = ("_cells", "_index", "mine")
    shared = True

    def __init__(self, array: SynchronizedArray[Any], index: int) -> None:
        self._cells = array.get_obj()  # the raw ctypes array: reads and writes without a lock
        self._index = index
        self.mine = 0
        self._cells[index] = 0

    def total(self) -> int:
        return int(sum(self._cells))

    def add(self, delta: int) -> None:
        self.mine += delta
        self._cells[self._index] = self.mine


class ShareSlots:
    """Requests running in this gateway replica, counted as its share of every replica's: a
    replica admits ``max_running / replicas`` (Ray replicas on many machines share no memory;
    Serve spreads requests over them)."""

    __slots__ = ("_replicas", "mine")
    shared = False

    def __init__(self, replicas: Callable[[], int]) -> None:
        self._replicas = replicas
        self.mine = 0

    def total(self) -> int:
        return self.mine * max(1, self._replicas())

    def add(self, delta: int) -> None:
        self.mine += delta
