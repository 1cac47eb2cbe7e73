"""The abuse harness: run bounded attacks on a served config (loopback only) and report what
the gateway's other clients saw meanwhile, its memory, and each attack's outcome.

    python -m loadtest.abuse [CONFIG] [--attacks a,b] [--out DIR]
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from loadtest.abuse_probe import Probe, Samples
from loadtest.attacks import ATTACKS, Target
from loadtest.experiment import (
    EXIT_DONE,
    EXIT_FAILED,
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
    settings_doc,
    split_list,
    write_report,
)
from loadtest.gateway import start_gateway, stop_gateway

NAME = "abuse"
DEFAULT_CONFIG = ROOT / "configs" / "local.yaml"
DESCRIPTION = """\
The abuse harness.

Attacks a served config on loopback, each attack bounded in time and count, and reports what
other clients saw meanwhile (a probe process: an established HTTP connection, an established
gRPC channel, a new connection every 250 ms), the gateway's memory and each outcome. The config
and the model zoo are copied to a temporary directory first (one attack swaps a model file
there). Writes OUT/report.json and OUT/report.md and prints the table. Exit 0 when every goal is
met, 1 when one is missed, 2 when the run could not start.
"""
LEARNING_PROFILE = "abuse_exp4"
BUDGET_S = {
    "baseline": 5.0,
    "amplification": 5.0,
    "gzip_bombs": 5.0,
    "big_json": 5.0,
    "idle_connections": 15.0,
    "slow_headers": 15.0,
    "feedback_forgery": 10.0,
}
"""Seconds each attack may run (the others are a fixed number of requests)."""
GOALS = {
    "amplification": "others' p99 < 50 ms, RSS +< 100 MB",
    "idle_connections": "every new client answered within 100 ms while they are held",
    "feedback_forgery": "no learning state changes",
    "model_swap": "the swapped model is refused",
}


def say(line: str) -> None:
    progress(NAME, line)


def workspace(config: Path, into: Path) -> Path:
    """A copy of ``config`` and of the model zoo laid out as in the project (relative paths
    keep working), with a learning profile added; the attacks may change files in it."""
    rel = config.resolve().relative_to(ROOT)
    copy = into / rel
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "models", into / "models")
    doc = yaml.safe_load(config.read_text())
    doc.setdefault("policies", {})[LEARNING_PROFILE] = {
        "selection": {"name": "exp4"},
        "aggregation": {"name": "weighted_vote", "params": {"weights": "learned"}},
    }
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    return copy


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def exposed(pid: int) -> list[str]:
    """Listening sockets of the gateway's process tree on anything but loopback."""
    out = []
    for proc in process_tree(pid):
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM
            if listening and c.laddr and not is_loopback(c.laddr.ip):
                out.append(f"{proc.name()}:{c.laddr.ip}:{c.laddr.port}")
    return out


class MemoryWatch:
    """The gateway tree's resident memory, sampled every 100 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.now()
        self.start = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for proc in process_tree(self.pid):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.now())

    @contextmanager
    def watching(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seen_by_others(samples: Samples, start_s: float, end_s: float) -> dict[str, Any]:
    """Per client kind, during [start_s, end_s] of the probe's clock: p50/p99 ms, errors."""
    out: dict[str, Any] = {}
    for kind, series in samples.series.items():
        window = [lat for at, lat in series if start_s <= at <= end_s]
        ok = [lat * 1000 for lat in window if lat is not None]
        p50, p99 = percentile(ok, 0.5), percentile(ok, 0.99)
        out[kind] = {
            "requests": len(window),
            "errors": len(window) - len(ok),
            "p50_ms": None if p50 is None else round(p50, 2),
            "p99_ms": None if p99 is None else round(p99, 2),
            "max_ms": round(max(ok), 2) if ok else None,
            "over_100ms": sum(1 for lat in ok if lat > 100),
        }
    return out


def run_attack(name: str, target: Target, pid: int) -> dict[str, Any]:
    probe = Probe(target.http_url, target.grpc_target)
    probe.start()
    time.sleep(1.0)
    watch = MemoryWatch(pid)
    with watch.watching():
        begin = time.time() - probe.started_at
        outcome = ATTACKS[name](target, BUDGET_S.get(name, 10.0))
        end = time.time() - probe.started_at
    time.sleep(0.5)
    samples = probe.stop()
    held_from = outcome.pop("held_from", None)
    if held_from is not None:  # connections opened, then held: what new clients saw meanwhile
        held = seen_by_others(samples, held_from - probe.started_at, end).get("new_client", {})
        outcome["new_client_while_held"] = held
    return {
        "attack": name,
        "seconds": round(end - begin, 1),
        "others": seen_by_others(samples, begin, end),
        "rss_mb_before": round(watch.start / 2**20),
        "rss_mb_peak": round(watch.peak / 2**20),
        "outcome": outcome,
    }


def judge(row: dict[str, Any]) -> Goal | None:
    """The attack's goal and whether it was met (None: the attack has no goal)."""
    name, out, others = row["attack"], row["outcome"], row["others"]
    if name == "amplification":
        p99 = max((o["p99_ms"] or 1e9) for o in others.values())
        grew = row["rss_mb_peak"] - row["rss_mb_before"]
        measured, passed = f"others' p99 {p99:g} ms, RSS +{grew} MB", p99 < 50 and grew < 100
    elif name == "idle_connections":  # once they are held open, as the goal says
        new = out.get("new_client_while_held", {})
        slowest = new.get("max_ms")
        measured = f"new clients: {new.get('errors')} errors, slowest {slowest} ms"
        passed = new.get("errors") == 0 and (slowest or 1e9) < 100
    elif name == "feedback_forgery":
        refused = all(k in ("http_401", "http_403") for k in out["answers"])
        measured = f"answers {out['answers']}, weights changed: {out['weights_changed']}"
        passed = refused and not out["weights_changed"]
    elif name == "model_swap":
        measured = f"reload {out['reload']}, old config serves: {out['old_config_serves']}"
        passed = out["reload"] == "http_400" and out["old_config_serves"]
    else:
        return None
    return Goal(GOALS[name], name, measured, bool(passed))


def table(report: Report) -> str:
    verdicts = {g.subject: g for g in goals_of(report)}
    header = [
        "attack", "s", "others p50 / p99 ms (http, grpc, health, new conn)", "errors", "RSS MB",
        "outcome", "goal",
    ]  # fmt: skip
    rows = []
    for row in report["attacks"]:
        o = row["others"]
        lat = ", ".join(
            f"{o[k]['p50_ms']} / {o[k]['p99_ms']}" if k in o else "-"
            for k in ("http", "grpc", "health", "new_client")
        )
        errors = sum(v["errors"] for v in o.values())
        rss = f"{row['rss_mb_before']} -> {row['rss_mb_peak']}"
        outcome = "; ".join(f"{k}: {v}" for k, v in row["outcome"].items())
        goal = verdicts.get(row["attack"])
        judged = "" if goal is None else f"{goal.name}: **{'met' if goal.passed else 'NOT met'}**"
        rows.append([row["attack"], row["seconds"], lat, errors, rss, outcome, judged])
    return markdown_table(header, rows)


def summary(report: Report) -> str:
    exposed = report["listening_off_loopback"] or "none"
    return (
        f"{table(report)}\n\nlistening off loopback: {exposed}; gateway exit code "
        f"{report['gateway_exit_code']}"
    )


def render_markdown(report: Report) -> str:
    lines = ["# Abuse harness", "", *header_lines(report), f"- config: `{report['config']}`"]
    return "\n".join([*lines, "", summary(report), "", goal_lines(goals_of(report)), ""])


def rejections(http_url: str) -> dict[str, float]:
    text = httpx.get(http_url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(
            ("ensemble_rejected_requests_total{", "ensemble_connections_closed_total{")
        ):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


@dataclass(frozen=True)
class Settings:
    """What one invocation attacks."""

    config: Path = DEFAULT_CONFIG
    attacks: tuple[str, ...] = tuple(ATTACKS)
    out: Path | None = None


def attack_all(settings: Settings, out: Path) -> dict[str, Any]:
    """Serve a copy of the config and run every attack on it; the report's body."""
    admin, feedback = secrets.token_hex(16), secrets.token_hex(16)
    tokens = {"ENSEMBLE_ADMIN_TOKEN": admin, "ENSEMBLE_FEEDBACK_TOKEN": feedback}
    with tempfile.TemporaryDirectory(prefix="ensemble-abuse-") as tmp:
        config = workspace(settings.config, Path(tmp))
        gw = start_gateway(config, out / "gateway.log", 180, env=tokens)
        target = Target(gw.url, gw.grpc, config, admin, feedback, LEARNING_PROFILE)
        rows = []
        try:
            open_ports = exposed(gw.proc.pid)
            for name in settings.attacks:
                say(name)
                rows.append(run_attack(name, target, gw.proc.pid))
            counted = rejections(gw.url)
        finally:
            code = stop_gateway(gw, 60)
    return {
        "config": str(settings.config),
        "listening_off_loopback": open_ports,
        "attacks": rows,
        "rejections_counted": counted,
        "gateway_exit_code": code,
        "goals": goals_doc([g for g in map(judge, rows) if g is not None]),
    }


def run(settings: Settings, command: str = "") -> Report:
    this = Run(NAME, settings.out, command)
    body = attack_all(settings, this.out)
    report: Report = {**this.header(), "settings": settings_doc(settings), **body}
    return write_report(this.out, report, render_markdown(report))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = new_parser(NAME, DESCRIPTION)
    parser.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"Gateway config to attack (default {DEFAULT_CONFIG.relative_to(ROOT)}).",
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, in order")
    add_common(parser, NAME, seed=False, quiet=False)
    args = parser.parse_args(argv)
    names = split_list(args.attacks)
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    return Settings(args.config, names, args.out)


def _missed_a_goal(report: Report) -> int:
    return EXIT_FAILED if any(g.passed is False for g in goals_of(report)) else EXIT_DONE


DRIVER = Driver(NAME, parse_args, run, summary, exit_code=_missed_a_goal)


def main(argv: Sequence[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
