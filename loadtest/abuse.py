"""The abuse harness: run bounded attacks on a served config (loopback only) and report what
the gateway's other clients saw meanwhile, its memory, and each attack's outcome.

    python -m loadtest.abuse [CONFIG] [--attacks a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from loadtest.abuse_probe import Probe, Samples
from loadtest.attacks import ATTACKS, Target
from loadtest.cli import start_server, stop_gateway

ROOT = Path(__file__).resolve().parents[1]
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


def verdict(row: dict[str, Any]) -> str | None:
    """Whether the attack's goal was met (None: it has none)."""
    name, out, others = row["attack"], row["outcome"], row["others"]
    if name == "amplification":
        p99 = max((o["p99_ms"] or 1e9) for o in others.values())
        grew = row["rss_mb_peak"] - row["rss_mb_before"]
        return "met" if p99 < 50 and grew < 100 else "NOT met"
    if name == "idle_connections":  # once they are held open, as the goal says
        new = out.get("new_client_while_held", {})
        return "met" if new.get("errors") == 0 and (new.get("max_ms") or 1e9) < 100 else "NOT met"
    if name == "feedback_forgery":
        refused = all(k in ("http_401", "http_403") for k in out["answers"])
        return "met" if refused and not out["weights_changed"] else "NOT met"
    if name == "model_swap":
        return "met" if out["reload"] == "http_400" and out["old_config_serves"] else "NOT met"
    return None


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| attack | s | others p50 / p99 ms (http, grpc, health, new conn) | errors | "
        "RSS MB | outcome | goal |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        o = row["others"]
        lat = ", ".join(
            f"{o[k]['p50_ms']} / {o[k]['p99_ms']}" if k in o else "-"
            for k in ("http", "grpc", "health", "new_client")
        )
        errors = sum(v["errors"] for v in o.values())
        rss = f"{row['rss_mb_before']} -> {row['rss_mb_peak']}"
        outcome = "; ".join(f"{k}: {v}" for k, v in row["outcome"].items())
        goal = row.get("verdict") or ""
        if goal:
            goal = f"{GOALS[row['attack']]}: **{goal}**"
        cells = [row["attack"], row["seconds"], lat, errors, rss, outcome, goal]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.abuse",
        description="Attack a served config on loopback, each attack bounded in time and count, "
        "and report what other clients saw, the gateway's memory and each outcome. The config "
        "and the model zoo are copied to a temporary directory first (one attack swaps a model "
        "file there).",
    )
    parser.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, in order")
    parser.add_argument("--out", type=Path, default=None, help="directory for report.json/.md")
    args = parser.parse_args(argv)
    names = [n for n in args.attacks.split(",") if n]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    admin, feedback = secrets.token_hex(16), secrets.token_hex(16)
    tokens = {"ENSEMBLE_ADMIN_TOKEN": admin, "ENSEMBLE_FEEDBACK_TOKEN": feedback}
    with tempfile.TemporaryDirectory(prefix="ensemble-abuse-") as tmp:
        config = workspace(args.config, Path(tmp))
        serve = ["serve", str(config), "--http-port", "0", "--grpc-port", "0"]
        gw = start_server(serve, Path(tmp) / "gw.log", 180, env=tokens)
        target = Target(gw.url, gw.grpc, config, admin, feedback, LEARNING_PROFILE)
        rows = []
        try:
            open_ports = exposed(gw.proc.pid)
            for name in names:
                print(f"abuse: {name}", file=sys.stderr, flush=True)
                row = run_attack(name, target, gw.proc.pid)
                row["verdict"] = verdict(row)
                rows.append(row)
            counted = rejections(gw.url)
        finally:
            code = stop_gateway(gw, 60)
            if gw.proc.stdout is not None:
                gw.proc.stdout.close()
    report = {
        "date": dt.date.today().isoformat(),
        "config": str(args.config),
        "listening_off_loopback": open_ports,
        "attacks": rows,
        "rejections_counted": counted,
        "gateway_exit_code": code,
    }
    md = table(rows)
    print(md)
    print(f"listening off loopback: {open_ports or 'none'}; gateway exit code {code}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        (args.out / "report.md").write_text(md + "\n")
    return 0 if all(r["verdict"] in (None, "met") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
