"""The PNG of `ensemble profile`: accuracy against p50 latency, the Pareto front drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; never a display, also on machines that have one

import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from ensemble.measure.rows import ProfileRow


def pareto_plot(rows: Sequence[ProfileRow], path: Path, title: str) -> None:
    """One point per member x tier, labelled; the front (higher accuracy, lower latency) in red
    and joined by a step line."""
    points = [(r, r.p50_ms, r.accuracy) for r in rows if r.accuracy is not None and r.p50_ms]
    fig, ax = plt.subplots(figsize=(9.0, 5.5))
    rest = [(x, y) for r, x, y in points if not r.pareto]
    front = sorted((x, y) for r, x, y in points if r.pareto)
    ax.scatter([x for x, _ in rest], [y for _, y in rest], color="tab:blue", label="dominated")
    ax.scatter(
        [x for x, _ in front],
        [y for _, y in front],
        color="tab:red",
        marker="D",
        zorder=3,
        label="Pareto front",
    )
    if front:
        ax.plot(
            [x for x, _ in front],
            [y for _, y in front],
            color="tab:red",
            linewidth=1,
            drawstyle="steps-post",
        )
    placed: list[tuple[float, float]] = []
    for r, x, y in points:
        # Points on top of each other (same accuracy, similar latency) get stacked labels.
        near = sum(1 for px, py in placed if abs(py - y) < 1e-6 and abs(px - x) <= 0.2 * x)
        placed.append((x, y))
        ax.annotate(
            r.label, (x, y), fontsize=7, xytext=(4, 3 - 10 * near), textcoords="offset points"
        )
    latencies = [x for _, x, _ in points]
    if latencies and max(latencies) > 10 * min(latencies):
        ax.set_xscale("log")
    ax.set_title(f"{title}: accuracy against p50 latency per member x tier")
    ax.set_xlabel("p50 latency of a member call (ms, emulated link included)")
    ax.set_ylabel("accuracy (test split)")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
