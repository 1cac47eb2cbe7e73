"""The autoscaling experiment's plot: rate, p99 and replicas of every system on one time axis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import autoscale_report as ar


def plot(rows: Sequence[dict[str, Any]], scenario: str, slo_ms: float, path: Path) -> None:
    """Stacked panels on one time axis: offered and answered rate, per-second p99 with the SLO,
    replicas (total), and replicas beyond the edge (gateway: cloud; Ray: beyond 3)."""
    import matplotlib.pyplot as plt

    import loadtest.plots  # noqa: F401 - selects the Agg backend before pyplot draws

    mine = [r for r in rows if r["scenario"] == scenario]
    if not mine:
        return
    fig, axes = plt.subplots(4, 1, figsize=(9.0, 10.0), sharex=True)
    rate, p99, reps, cloud = axes
    first = mine[0]["timeline"]
    rate.plot([r["t"] + 0.5 for r in first], [r["sent"] for r in first], color="black",
              linewidth=1.6, drawstyle="steps-mid", label="offered")  # fmt: skip
    for r in mine:
        t = [x["t"] + 0.5 for x in r["timeline"]]
        rate.plot(t, [x["answered"] for x in r["timeline"]], linewidth=1, drawstyle="steps-mid",
                  label=f"answered: {r['system']}")  # fmt: skip
        p99.plot(t, [x["p99_ms"] if x["p99_ms"] is not None else float("nan")
                     for x in r["timeline"]], linewidth=1, label=r["system"])  # fmt: skip
        pt = [p[0] for p in r["replicas"]]
        reps.plot(pt, [sum(p[1].values()) for p in r["replicas"]], drawstyle="steps-post",
                  linewidth=1.2, label=r["system"])  # fmt: skip
        beyond = [
            p[1].get("cloud", 0) if "ray" not in p[1] else max(0, p[1]["ray"] - ar.EDGE_SLOTS)
            for p in r["replicas"]
        ]
        cloud.plot(pt, beyond, drawstyle="steps-post", linewidth=1.2, label=r["system"])
    p99.axhline(slo_ms, color="tab:red", linestyle="--", linewidth=0.8, label=f"SLO {slo_ms:g}")
    p99.set_yscale("log")
    labels = (
        "requests / s",
        "p99 per second (ms)",
        "replicas (all)",
        "cloud replicas\n(Ray: beyond 3)",
    )
    for ax, label in zip(axes, labels, strict=True):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    rate.set_title(f"autoscale {scenario}: rate, p99, replicas")
    cloud.set_xlabel("time since start (s)")
    end = max(float(r["timeline"][-1]["t"] + 1) for r in mine if r["timeline"])
    cloud.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
