"""What one placement is measured with: the test split and its feeds, accuracy, latency, RSS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.errors import EnsembleError
from ensemble.measure.settings import ProfileSettings
from ensemble.models.layout import TEST_SET_FILE
from ensemble.replicas.base import Replica
from ensemble.replicas.member import Member

ACCURACY_CHUNK_ROWS = 256
"""Test rows per call when scoring accuracy (well under any server's batch limit)."""


def rss_bytes() -> int:
    """This process's resident set size after giving free heap pages back to the system (so
    memory freed by an earlier member is not silently reused by the next one); Linux /proc,
    0 where unavailable."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import resource

    return resident * resource.getpagesize()


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the deltas may then undercount


@dataclass
class TestSplit:
    x: np.ndarray
    y: np.ndarray
    source: str


def load_test_split(zoo_dir: Path) -> TestSplit | None:
    path = zoo_dir / TEST_SET_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return TestSplit(
            np.ascontiguousarray(data["X"], dtype=np.float32),
            np.asarray(data["y"], dtype=np.int64),
            f"test ({path.name}, n={len(data['y'])})",
        )


def _test_split_fits(member: Member, split: TestSplit | None) -> bool:
    if split is None or len(member.inputs) != 1:
        return False
    spec = member.inputs[0]
    return (
        spec.datatype == "FP32"
        and len(spec.shape) == 2
        and spec.shape[1] in (-1, split.x.shape[1])
        and member.schema is not None
        and all(isinstance(c, int) for c in member.schema.classes)
    )


def _feed(member: Member, split: TestSplit | None, batch: int, i: int) -> dict[str, np.ndarray]:
    """Request ``i``'s feed: ``batch`` consecutive test rows (cycling), else zeros."""
    if split is not None and _test_split_fits(member, split):
        n = len(split.x)
        rows = [(i * batch + k) % n for k in range(batch)]
        return {member.inputs[0].name: split.x[rows]}
    from ensemble.oip.datatypes import OIP_TO_NUMPY

    feed = {}
    for spec in member.inputs:
        shape = tuple(batch if d == -1 and k == 0 else max(d, 1) for k, d in enumerate(spec.shape))
        feed[spec.name] = np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])
    return feed


async def measure_accuracy(
    member: Member, replica: Replica, split: TestSplit | None
) -> tuple[float | None, str]:
    card = member.card
    fallback = (card.test_accuracy, "card (test_accuracy)") if card else (None, "none")
    if split is None or not _test_split_fits(member, split):
        return fallback
    assert member.schema is not None
    classes = np.asarray(member.schema.classes, dtype=np.int64)
    correct = 0
    for start in range(0, len(split.x), ACCURACY_CHUNK_ROWS):
        x = split.x[start : start + ACCURACY_CHUNK_ROWS]
        feed = {member.inputs[0].name: x}
        for attempt in range(3):  # an emulated lossy link may drop a call
            try:
                result = await replica.infer(feed, member.score_outputs)
                break
            except EnsembleError:
                if attempt == 2:
                    return fallback[0], f"{fallback[1]}; test split failed"
        predicted = classes[np.argmax(member.scores(result), axis=1)]
        correct += int(np.sum(predicted == split.y[start : start + ACCURACY_CHUNK_ROWS]))
    return correct / len(split.x), split.source


async def measure_latency(
    member: Member,
    replicas: list[Replica],
    split: TestSplit | None,
    settings: ProfileSettings,
) -> tuple[list[float], int, float]:
    """Call the tier's replicas round robin from ``concurrency`` workers; returns the latencies
    (s) of successful calls, the failures, and the wall time."""
    outputs = member.score_outputs
    for i in range(settings.warmup):
        with contextlib.suppress(EnsembleError):  # warm-up: failures do not count
            await replicas[i % len(replicas)].infer(
                _feed(member, split, settings.batch, i), outputs
            )
    latencies: list[float] = []
    failures = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + settings.max_seconds

    async def worker() -> None:
        nonlocal issued, failures
        while issued < settings.requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            feed = _feed(member, split, settings.batch, i)
            t0 = time.perf_counter()
            try:
                await replicas[i % len(replicas)].infer(feed, outputs)
            except EnsembleError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
    return latencies, failures, time.perf_counter() - start
