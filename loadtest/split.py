"""Split computing: end-to-end latency of every way a split member can run under three links,
against what its split policy chooses (its regret), through a real gateway.

`python -m loadtest.split` (see --help).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.experiment import (
    ROOT,
    Driver,
    Goal,
    Report,
    Run,
    add_common,
    goal_lines,
    goals_doc,
    goals_of,
    header_lines,
    markdown_table,
    new_parser,
    progress,
    run_tokens,
    settings_doc,
    write_report,
)

NAME = "split"
ZOO = ROOT / "models" / "digits"
LINKS: dict[str, dict[str, float]] = {
    "lan": {"delay_ms": 0.5, "bandwidth_mbps": 1000.0},
    "4g": {"delay_ms": 25.0, "bandwidth_mbps": 20.0},
    "constrained": {"delay_ms": 1.0, "bandwidth_mbps": 0.32},
}
"""The three link settings: one-way delay and bandwidth to the cloud (no jitter, no loss)."""
CHOSEN = re.compile(r'ensemble_split_calls_total\{member="mlp_deep",option="([^"]+)"\} (\S+)')

DESCRIPTION = """\
Split computing under three links: where should the zoo's mlp_deep run?

Serves the zoo's `mlp_deep` (a 24-wide layer, then two of 1024: a funnel) split between an
emulated edge device --slowdown times slower than this machine and a cloud behind an emulated
link, on free ports. For each link setting (lan: 0.5 ms one way, 1 Gbit/s; 4g: 25 ms, 20
Mbit/s; constrained: 1 ms, 0.32 Mbit/s), set through the admin API: --requests requests of
--rows test rows each (one closed-loop client, HTTP) forced to each way the member can run
(request parameter `split`: all on the edge, all in the cloud, each offered cut), then
--requests more left to the member's split policy (`latency`). Per setting: p50 and p95 of
every way, the policy's, which way it chose (from /metrics), and its regret: its p50 over the
best way's. Goals: the policy's p50 within 10% (or 0.5 ms) of the measured best in every
setting, and its choice changing with the link. Writes OUT/report.json and OUT/report.md.
"""


@dataclass(frozen=True)
class Settings:
    requests: int = 200
    rows: int = 1
    slowdown: float = 100.0
    out: Path | None = None


def config(settings: Settings) -> dict[str, Any]:
    return {
        "model_zoo": {"dir": str(ZOO)},
        "tiers": {
            "edge": {"compute_slowdown": settings.slowdown},
            "cloud": {"link": {"emulate": True, "delay_ms": 0.5, "jitter_ms": 0}},
        },
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    {
                        "name": "mlp_deep",
                        "model": str(ZOO / "mlp_deep.onnx"),
                        "placement": [{"tier": "edge"}, {"tier": "cloud"}],
                        "split": {},
                    }
                ],
            }
        ],
    }


def chosen_counts(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in CHOSEN.finditer(text)}


def drive(client: Any, x: np.ndarray, settings: Settings, split: str | None) -> dict[str, Any]:
    """``settings.requests`` requests (forced to ``split`` when given); latency percentiles."""
    import time

    latencies, failed = [], 0
    for i in range(settings.requests):
        rows = x[(i * settings.rows + np.arange(settings.rows)) % len(x)]
        body: dict[str, Any] = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "data": rows.ravel().tolist(),
                }
            ],
        }
        if split is not None:
            body["parameters"] = {"split": split}
        start = time.perf_counter()
        reply = client.post("/v2/models/mlp_deep/infer", json=body)
        if reply.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failed += 1
    ms = np.asarray(latencies) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "answered": len(latencies),
        "failed": failed,
    }


def run_link(url: str, admin: str, name: str, x: np.ndarray, settings: Settings) -> dict[str, Any]:
    import httpx

    auth = {"authorization": f"Bearer {admin}"}
    changed = httpx.put(f"{url}/admin/links/cloud", json=LINKS[name], headers=auth, timeout=30)
    changed.raise_for_status()
    with httpx.Client(base_url=url, timeout=60) as client:
        ways = {}
        for option in options(url):
            progress(NAME, f"{name}: {option}")
            ways[option] = drive(client, x, settings, option)
        before = chosen_counts(url)
        policy = drive(client, x, settings, None)
        after = chosen_counts(url)
    choices = {k: int(after.get(k, 0) - before.get(k, 0)) for k in after}
    best = min(ways, key=lambda k: ways[k]["p50_ms"] or float("inf"))
    return {
        "link": name,
        "settings": LINKS[name],
        "ways": ways,
        "policy": policy,
        "choices": {k: v for k, v in choices.items() if v},
        "best": best,
        "regret_ms": policy["p50_ms"] - ways[best]["p50_ms"],
    }


def options(url: str) -> list[str]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.findall(
        r'ensemble_split_expected_seconds\{member="mlp_deep",option="([^"]+)"\}', text
    )
    return list(dict.fromkeys(found))


def goals(links: list[dict[str, Any]]) -> list[Goal]:
    out = []
    for r in links:
        best = r["ways"][r["best"]]["p50_ms"]
        ok = r["regret_ms"] <= max(0.1 * best, 0.5)
        out.append(
            Goal(
                "policy p50 within 10% (or 0.5 ms) of the best way",
                r["link"],
                f"{r['policy']['p50_ms']:.2f} ms vs best {r['best']} {best:.2f} ms",
                ok,
                {"regret_ms": r["regret_ms"]},
            )
        )
    mains = [max(r["choices"], key=r["choices"].get) if r["choices"] else None for r in links]
    out.append(
        Goal(
            "the choice changes with the link",
            "",
            " -> ".join(map(str, mains)),
            len(set(mains)) > 1,
        )
    )
    lost = sum(w["failed"] for r in links for w in [*r["ways"].values(), r["policy"]])
    out.append(Goal("every request answered", "", f"{lost} failed", lost == 0))
    return out


def render_markdown(report: Report) -> str:
    lines = ["# Split computing under three links", "", *header_lines(report), ""]
    for r in report["links"]:
        s = r["settings"]
        lines += [
            f"## {r['link']}: {s['delay_ms']:g} ms one way, {s['bandwidth_mbps']:g} Mbit/s",
            "",
        ]
        rows = [
            [way, f"{w['p50_ms']:.2f}", f"{w['p95_ms']:.2f}", "best" if way == r["best"] else ""]
            for way, w in r["ways"].items()
        ]
        p = r["policy"]
        chose = ", ".join(f"{k} {v}" for k, v in r["choices"].items())
        rows.append(
            [
                f"policy (`latency`): {chose}",
                f"{p['p50_ms']:.2f}",
                f"{p['p95_ms']:.2f}",
                f"regret {r['regret_ms']:+.2f} ms",
            ]
        )
        lines += [markdown_table(["way", "p50 ms", "p95 ms", ""], rows), ""]
    lines += ["```", goal_lines(goals_of(report)), "```"]
    return "\n".join(lines)


def run(settings: Settings, command: str = "") -> Report:
    import os

    import yaml

    from ensemble.auth import ADMIN_TOKEN_ENV
    from ensemble.models import ensure_zoo
    from loadtest.gateway import start_gateway, stop_gateway

    this = Run(NAME, settings.out, command)
    ensure_zoo(ZOO)
    data = np.load(ZOO / "test.npz")
    x = data["X"].astype(np.float32)
    path = this.out / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(settings), sort_keys=False))
    results = []
    with run_tokens(ADMIN_TOKEN_ENV):
        gw = start_gateway(path, this.out / "gateway.log", 120)
        try:
            for name in LINKS:
                results.append(run_link(gw.url, os.environ[ADMIN_TOKEN_ENV], name, x, settings))
        finally:
            exit_code = stop_gateway(gw, 60)
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out)),
        "gateway_exit_code": exit_code,
        "links": results,
        "goals": goals_doc(goals(results)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME, quick="40 requests per way (default 200).", seed=False, quiet=False)
    add = parser.add_argument
    add("--requests", type=int, help="Requests per way and for the policy (default 200).")
    add("--rows", type=int, default=1, help="Rows per request (default 1).")
    add("--slowdown", type=float, default=100.0, help="The edge's emulated slowdown (100).")
    args = parser.parse_args(argv)
    requests = args.requests if args.requests is not None else (40 if args.quick else 200)
    if requests < 1 or args.rows < 1 or args.slowdown < 1:
        parser.error("--requests, --rows and --slowdown must be at least 1")
    return Settings(requests=requests, rows=args.rows, slowdown=args.slowdown, out=args.out)


def summary(report: Report) -> str:
    return goal_lines(goals_of(report))


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
