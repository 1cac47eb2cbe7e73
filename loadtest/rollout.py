"""Versions rolled out on evidence: a deliberately worse version rolled back, a better one
promoted, and no request lost while it happens (nor while a version is unloaded).

`python -m loadtest.rollout` (see --help).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections import Counter
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

NAME = "rollout"
MEMBERS = ("falling", "rising")
"""`falling`: mlp_small, its canary the worse copy; `rising`: the worse copy, its canary forest."""

DESCRIPTION = """\
Canary rollouts decided by evidence, and no request lost while they are.

For each of --runs runs (a seed each): makes a deliberately worse copy of the zoo's mlp_small
(Gaussian noise of --noise times each weight matrix's spread added to its weights; about 63%
right on the test split against mlp_small's 96%), serves an ensemble of three members on free
ports: `logreg`; `falling` (version 1 mlp_small, version 2 the worse copy as a canary); `rising`
(version 1 the worse copy, version 2 the zoo's forest as a canary). Each canary answers --weight
of its member's calls and is judged with the gateway's default thresholds (error rate +0.01,
p95 latency x1.5 and +5 ms, accuracy -0.02) on --min-calls calls and --min-labels labelled rows.
--clients closed-loop clients send unlabelled requests the whole run; one more sends requests
of --rows test rows and posts every answer's true labels to the feedback API, until both
rollouts are decided (at most --max-requests). Then, still under load, the rolled back version
is unloaded through the repository API (`POST /v2/repository/models/falling/unload`).

Per run: labelled requests until each decision, the evidence it was made on, every response's
status (traffic, labelled requests, the unload). Goals: the worse canary is rolled back and the
better one promoted within --goal-requests labelled requests each; no request lost (every
response 200) through both decisions and the unload. Writes OUT/report.json and OUT/report.md.
"""


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    weight: float = 0.1
    min_calls: int = 100
    min_labels: int = 200
    rows: int = 8
    clients: int = 2
    max_requests: int = 2000
    goal_requests: int = 500
    noise: float = 1.5
    out: Path | None = None


def degraded_copy(source: Path, target: Path, *, noise: float, seed: int) -> str:
    """``source`` with Gaussian noise (``noise`` times each weight matrix's own standard
    deviation) added to its 2-D float weights, written to ``target``: a deliberately worse
    version of the same model (same inputs and classes). Its SHA-256."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.ndim == 2:
            noisy = weights + rng.normal(0.0, noise * float(weights.std()), weights.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    data = model.SerializeToString()
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def config(settings: Settings, zoo: Path, worse: Path, digest: str) -> dict[str, Any]:
    """The served config: `logreg`, and the two members whose canaries are judged."""
    rollout = {
        "version": "2",
        "weight": settings.weight,
        "min_calls": settings.min_calls,
        "min_labels": settings.min_labels,
    }
    edge = [{"tier": "edge"}]
    worse_model = {"model": str(worse), "sha256": digest}
    return {
        "model_zoo": {"dir": str(zoo)},
        "ensembles": [
            {
                "name": "digits",
                "members": [
                    {"name": "logreg", "model": str(zoo / "logreg.onnx"), "placement": edge},
                    {
                        "name": "falling",
                        "model": str(zoo / "mlp_small.onnx"),
                        "placement": edge,
                        "versions": [{"version": "2", **worse_model}],
                        "rollout": rollout,
                    },
                    {
                        "name": "rising",
                        **worse_model,
                        "placement": edge,
                        "versions": [{"version": "2", "model": str(zoo / "forest.onnx")}],
                        "rollout": rollout,
                    },
                ],
            }
        ],
    }


class Load:
    """Closed-loop clients sending unlabelled requests until stopped; every status kept (0:
    the connection broke)."""

    def __init__(self, url: str, body: dict[str, Any], clients: int) -> None:
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, body), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        import httpx

        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    status = client.post("/v2/models/digits/infer", json=body).status_code
                except httpx.TransportError:
                    status = 0
                self.statuses[status] += 1

    def stop(self) -> Counter[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.statuses


def tensor(x: np.ndarray) -> dict[str, Any]:
    return {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}


def labelled_stream(
    settings: Settings, url: str, x: np.ndarray, y: np.ndarray, seed: int, admin: str, label: str
) -> dict[str, Any]:
    """Labelled requests until both rollouts are decided; when each was, and on what."""
    import httpx

    decided: dict[str, dict[str, Any]] = {}
    statuses: Counter[int] = Counter()
    order = np.random.default_rng(seed).permutation(len(x))
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(settings.max_requests):
            rows = order[(i * settings.rows + np.arange(settings.rows)) % len(x)]
            reply = client.post("/v2/models/digits/infer", json={"inputs": [tensor(x[rows])]})
            statuses[reply.status_code] += 1
            if reply.status_code == 200:
                body = {"feedback_id": reply.json()["parameters"]["feedback_id"],
                        "label": y[rows].tolist()}  # fmt: skip
                sent = client.post("/v2/models/digits/feedback", json=body,
                                   headers={"authorization": f"Bearer {label}"})  # fmt: skip
                statuses[sent.status_code] += 1
            report = client.get("/admin/rollouts", headers={"authorization": f"Bearer {admin}"})
            for entry in report.json()["rollouts"]:
                rollout = entry["rollout"]
                if rollout["phase"] != "running" and entry["member"] not in decided:
                    decided[entry["member"]] = {"after_requests": i + 1, **rollout}
            if len(decided) == len(MEMBERS):
                break
    return {"decided": decided, "statuses": dict(statuses)}


def run_once(settings: Settings, seed: int, out: Path, zoo: Path) -> dict[str, Any]:
    import httpx
    import yaml

    from ensemble.auth import ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV
    from loadtest.gateway import start_gateway, stop_gateway

    worse = out / f"worse-{seed}.onnx"
    digest = degraded_copy(zoo / "mlp_small.onnx", worse, noise=settings.noise, seed=seed)
    path = out / f"gateway-{seed}.yaml"
    path.write_text(yaml.safe_dump(config(settings, zoo, worse, digest), sort_keys=False))
    data = np.load(zoo / "test.npz")
    x, y = data["X"].astype(np.float32), data["y"].astype(np.int64)
    admin, label = os.environ[ADMIN_TOKEN_ENV], os.environ[FEEDBACK_TOKEN_ENV]
    gw = start_gateway(path, out / f"gateway-{seed}.log", 120)
    try:
        load = Load(gw.url, {"inputs": [tensor(x[:4])]}, settings.clients)
        try:
            stream = labelled_stream(settings, gw.url, x, y, seed, admin, label)
            unload = httpx.post(
                f"{gw.url}/v2/repository/models/falling/unload",
                json={"parameters": {"version": "2"}},
                headers={"authorization": f"Bearer {admin}"},
                timeout=120,
            )
            after = httpx.get(f"{gw.url}/v2/models/falling", timeout=30).json()["versions"]
        finally:
            traffic = load.stop()
    finally:
        exit_code = stop_gateway(gw, 60)
    return {
        "seed": seed,
        **stream,
        "traffic": dict(traffic),
        "unload": {"status": unload.status_code, "versions_after": after},
        "gateway_exit_code": exit_code,
    }


def goals(runs: list[dict[str, Any]], settings: Settings) -> list[Goal]:
    out = []
    for member, want in (("falling", "rolled_back"), ("rising", "promoted")):
        for r in runs:
            d = r["decided"].get(member)
            n = d["after_requests"] if d else None
            ok = (
                d is not None
                and n is not None
                and d["phase"] == want
                and n <= settings.goal_requests
            )
            seen = f"{d['phase']} after {n} labelled requests" if d else "undecided"
            if d and d["phase"] != want:
                seen += f" ({d['reason']})"
            out.append(Goal(f"{member}: {want.replace('_', ' ')} within "
                            f"{settings.goal_requests} labelled requests", f"seed {r['seed']}",
                            seen, ok, {"after_requests": n}))  # fmt: skip
    for r in runs:
        statuses = Counter(r["traffic"]) + Counter(r["statuses"])
        lost = sum(v for k, v in statuses.items() if int(k) != 200) + (r["unload"]["status"] != 200)
        total = sum(statuses.values())
        out.append(Goal("no request lost (every response 200)", f"seed {r['seed']}",
                        f"{total - lost} of {total} answered 200", lost == 0,
                        {"responses": total, "lost": lost}))  # fmt: skip
    return out


def render_markdown(report: Report) -> str:
    rows = []
    for r in report["runs"]:
        for member in MEMBERS:
            d = r["decided"].get(member, {})
            ev = d.get("evidence", {})
            rows.append([
                r["seed"], member, d.get("phase", "undecided"), d.get("after_requests", "-"),
                *(f"{ev.get(v, {}).get('calls', 0)} / {ev.get(v, {}).get('labelled', 0)} / "
                  f"{(ev.get(v, {}).get('accuracy') or 0):.3f}" for v in ("1", "2")),
                d.get("reason", ""),
            ])  # fmt: skip
    lines = [
        "# Canary rollouts decided by evidence",
        "",
        *header_lines(report),
        "",
        markdown_table(
            [
                "seed",
                "member",
                "decision",
                "labelled requests",
                "v1 calls / rows / accuracy",
                "v2 (canary) calls / rows / accuracy",
                "readings",
            ],
            rows,
        ),
        "",
        "Responses per run (background traffic + labelled stream + the unload):",
        "",
    ]
    for r in report["runs"]:
        lines.append(f"- seed {r['seed']}: traffic {r['traffic']}, labelled stream "
                     f"{r['statuses']}, unload of falling version 2: {r['unload']['status']} "
                     f"(versions after: {r['unload']['versions_after']})")  # fmt: skip
    lines += ["", "```", goal_lines(goals_of(report)), "```"]
    return "\n".join(lines)


def run(settings: Settings, command: str = "") -> Report:
    from ensemble.auth import ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV
    from ensemble.models import ensure_zoo

    this = Run(NAME, settings.out, command)
    zoo = ROOT / "models" / "digits"
    ensure_zoo(zoo)
    runs = []
    with run_tokens(ADMIN_TOKEN_ENV, FEEDBACK_TOKEN_ENV):
        for seed in range(settings.runs):
            progress(NAME, f"run {seed + 1} of {settings.runs}")
            runs.append(run_once(settings, seed, this.out, zoo))
    report: Report = {
        **this.header(),
        "settings": settings_doc(settings, out=str(this.out)),
        "runs": runs,
        "goals": goals_doc(goals(runs, settings)),
    }
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    add_common(parser, NAME, quick="One run (seed 0).", seed=False, quiet=False)
    add = parser.add_argument
    add("--runs", type=int, default=3, help="Runs, one seed each (default 3).")
    add("--weight", type=float, default=0.1, help="Canary share of calls (default 0.1).")
    add("--min-calls", type=int, default=100, help="Calls each version needs (default 100).")
    add("--min-labels", type=int, default=200, help="Labelled rows each needs (default 200).")
    add("--rows", type=int, default=8, help="Rows per labelled request (default 8).")
    add("--clients", type=int, default=2, help="Unlabelled closed-loop clients (default 2).")
    add("--max-requests", type=int, default=2000, help="Labelled requests at most (2000).")
    add("--goal-requests", type=int, default=500, help="Goal: decided within (default 500).")
    add("--noise", type=float, default=1.5, help="Noise on the worse copy's weights (1.5).")
    args = parser.parse_args(argv)
    if not 0 < args.weight < 1 or min(args.runs, args.rows, args.max_requests) < 1:
        parser.error("--weight must be in (0, 1); --runs, --rows, --max-requests at least 1")
    return Settings(
        runs=1 if args.quick else args.runs,
        weight=args.weight,
        min_calls=args.min_calls,
        min_labels=args.min_labels,
        rows=args.rows,
        clients=args.clients,
        max_requests=args.max_requests,
        goal_requests=args.goal_requests,
        noise=args.noise,
        out=args.out,
    )


def summary(report: Report) -> str:
    return goal_lines(goals_of(report))


DRIVER = Driver(NAME, parse_args, run, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
