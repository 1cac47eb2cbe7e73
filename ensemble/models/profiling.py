"""Run an ONNX classifier under fixed onnxruntime settings: predictions and latency profiles."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from ensemble.models.card import LatencyStats

BATCH_RUNS: dict[int, int] = {1: 200, 32: 50}
"""Batch size -> timed runs for a card's latency profile."""


@dataclass(frozen=True)
class Predictions:
    """A classifier's answers for a batch: one label and one probability row per example."""

    labels: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float32]

    def accuracy(self, truth: npt.NDArray[np.int64]) -> float:
        return float(np.mean(self.labels == truth))


def profiling_session(model_path: Path) -> ort.InferenceSession:
    """Open a session with the settings cards are measured under: one thread, sequential."""
    options = ort.SessionOptions()
    # One thread each: a card states the cost of one call on one core, comparable across
    # members; the gateway scales out by replicas, not by intra-op threads.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict(
    session: ort.InferenceSession,
    x: npt.NDArray[np.float32],
    *,
    probability_output: str,
    label_output: str | None,
    classes: list[int],
) -> Predictions:
    """Run ``x`` through a single-input classifier; without a label output, take the argmax."""
    input_name = session.get_inputs()[0].name
    wanted = [probability_output] if label_output is None else [probability_output, label_output]
    results = session.run(wanted, {input_name: x})
    probabilities = np.asarray(results[0], dtype=np.float32)
    if label_output is None:
        labels = np.asarray(classes, dtype=np.int64)[np.argmax(probabilities, axis=1)]
    else:
        labels = np.asarray(results[1], dtype=np.int64).reshape(-1)
    return Predictions(labels=labels, probabilities=probabilities)


def measure_latency(
    session: ort.InferenceSession, feeds: dict[str, Any], *, runs: int, warmup: int
) -> LatencyStats:
    """Time ``runs`` sequential calls of ``session`` on ``feeds`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples_ns = np.empty(runs, dtype=np.float64)
    for index in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feeds)
        samples_ns[index] = time.perf_counter_ns() - start
    samples_ms = samples_ns / 1e6
    return LatencyStats(
        p50_ms=round(float(np.percentile(samples_ms, 50)), 4),
        p99_ms=round(float(np.percentile(samples_ms, 99)), 4),
        mean_ms=round(float(np.mean(samples_ms)), 4),
        runs=runs,
    )


def latency_profile(
    session: ort.InferenceSession, x: npt.NDArray[np.float32]
) -> dict[str, LatencyStats]:
    """Measure the card's batch sizes on the first rows of ``x`` (real data: tree depth varies)."""
    input_name = session.get_inputs()[0].name
    profile: dict[str, LatencyStats] = {}
    for batch, runs in BATCH_RUNS.items():
        feeds = {input_name: np.ascontiguousarray(x[:batch])}
        profile[f"batch_{batch}"] = measure_latency(
            session, feeds, runs=runs, warmup=max(5, runs // 10)
        )
    return profile
