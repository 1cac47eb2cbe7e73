"""PNG plots of a report's per-second timeline: latency, throughput and errors, accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display, also on machines that have one

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_SIZE = (9.0, 4.0)


def _marks(ax: Axes, report: dict[str, Any]) -> None:
    for i, mark in enumerate(report["faults"]):
        ax.axvline(mark["at_s"], color="tab:purple", linestyle=":", linewidth=1)
        ax.annotate(
            mark["name"],
            (mark["at_s"], 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="tab:purple",
            rotation=90,
            va="top",
            ha="right",
            xytext=(-2, -2 - 10 * (i % 3)),
            textcoords="offset points",
        )


def _finish(
    fig: Figure, ax: Axes, report: dict[str, Any], title: str, ylabel: str, path: Path
) -> None:
    ax.set_title(f"{report['scenario']['name']}: {title}")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _marks(ax, report)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latency_plot(report: dict[str, Any], path: Path) -> None:
    rows = report["timeline"]
    t = [r["t"] + 0.5 for r in rows]
    fig, ax = plt.subplots(figsize=_SIZE)
    for key, style in (("p50", "-"), ("p95", "-"), ("p99", "-"), ("max", ":")):
        values = [r["latency_ms"][key] if r["latency_ms"][key] is not None else float("nan")
                  for r in rows]  # fmt: skip
        ax.plot(t, values, style, label=key, linewidth=1.2)
    for name, target in report_slo_latency(report):
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=0.8)
        ax.annotate(
            f"SLO {name}",
            (0.01, target),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="tab:red",
            va="bottom",
        )
    ax.set_yscale("log")
    _finish(fig, ax, report, "latency per second (successful answers)", "latency (ms)", path)


def report_slo_latency(report: dict[str, Any]) -> list[tuple[str, float]]:
    return [
        (c["name"].removeprefix("latency "), float(c["target"]))
        for c in report["slo"]["checks"]
        if c["name"].startswith("latency ")
    ]


def throughput_plot(report: dict[str, Any], path: Path) -> None:
    rows = report["timeline"]
    t = [r["t"] + 0.5 for r in rows]
    fig, ax = plt.subplots(figsize=_SIZE)
    for key, label in (("sent", "sent"), ("answered", "answered"), ("goodput", "goodput")):
        ax.plot(t, [r[key] for r in rows], label=label, linewidth=1.2, drawstyle="steps-mid")
    ax.bar(t, [r["errors"] for r in rows], width=0.8, color="tab:red", alpha=0.5, label="errors")
    _finish(fig, ax, report, "throughput and errors per second", "requests / s", path)


def accuracy_plot(report: dict[str, Any], path: Path) -> None:
    rows = report["timeline"]
    t = [r["t"] + 0.5 for r in rows]
    fig, ax = plt.subplots(figsize=_SIZE)
    values = [r["accuracy"] if r["accuracy"] is not None else float("nan") for r in rows]
    ax.plot(t, values, marker=".", label="accuracy", linewidth=1.2)
    for c in report["slo"]["checks"]:
        if c["name"] == "accuracy":
            ax.axhline(c["target"], color="tab:red", linestyle="--", linewidth=0.8, label="SLO")
    ax.set_ylim(0, 1.02)
    _finish(fig, ax, report, "accuracy of answers per second", "accuracy", path)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the three PNGs; returns their paths."""
    paths = [out_dir / "latency.png", out_dir / "throughput.png", out_dir / "accuracy.png"]
    for plot, path in zip((latency_plot, throughput_plot, accuracy_plot), paths, strict=True):
        plot(report, path)
    return paths
