"""The benchmark's record: machine facts, rows, ratios against the goals, and the printed table."""

from __future__ import annotations

import http.client
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench_clients import LoadResult, oip_http_headers
from loadtest.experiment import Goal, Report, goal_lines, goals_doc, goals_of, text_table
from loadtest.peers import Peer, machine_busy_seconds
from loadtest.wrk import WrkResult

REFERENCE_CONCURRENCY = 32
GOALS = (
    ("gateway HTTP throughput vs Ray Serve at c=32", "throughput_vs_ray_serve", ">=", 30.0),
    ("gateway HTTP throughput vs no-op ceiling at c=32", "throughput_vs_noop", ">=", 0.5),
    ("gateway HTTP p50 overhead over the onnxruntime floor at c=1 (ms)", "overhead", "<=", 0.5),
    ("N-worker gateway HTTP throughput vs one worker at c=32", "workers_speedup", ">=", 1.7),
    ("N-worker gateway HTTP throughput vs no-op ceiling at c=32", "workers_vs_noop", ">=", 0.25),
    ("N-worker gateway HTTP throughput vs Ray Serve at c=32", "workers_vs_ray_serve", ">=", 60.0),
    ("N-worker gateway server cores at saturation (HTTP)", "workers_server_cores", ">=", 1.8),
    ("gateway gRPC CPU per request vs HTTP's at c=32", "grpc_cpu_vs_http", "<=", 1.5),
)
GENERATORS = {
    "http_closed_loop": "wrk -t1 -c N --latency, Lua script POSTing the binary OIP body",
    "grpc_closed_loop": "grpc.aio in N processes, raw ModelInfer bytes over 2 channels each",
    "http_open_loop": "loadtest.bench_clients on the harness's HTTP client at a fixed rate, "
    "latency from the intended send time, at most 64 connections",
}


class AnswerMismatch(RuntimeError):
    """The peers do not compute the same answer, so their speeds are not comparable."""


def versions() -> dict[str, str]:
    """Versions of what the systems under test and the generators run on."""
    out = {}
    for name in ("onnxruntime", "ray", "uvicorn", "httptools", "uvloop", "grpcio", "zttp", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    out["wrk"] = (
        (wrk.stdout or wrk.stderr).splitlines()[0].strip() if wrk.stdout or wrk.stderr else ""
    )
    return out


def busy_cores(window_s: float) -> float:
    """How many cores the machine keeps busy right now (other users, leftovers)."""
    before = machine_busy_seconds()
    time.sleep(window_s)
    return round((machine_busy_seconds() - before) / window_s, 3)


def row(result: WrkResult | LoadResult, cpu: dict[str, float]) -> dict[str, Any]:
    """One system at one load level, in the units report.json uses (ms, req/s, cores)."""
    out: dict[str, Any] = {"rps": round(result.rps, 1), "requests": result.requests}
    for key, value in result.latency_ms.items():
        out[f"{key}_ms"] = round(value, 3)
    out.update(cpu)
    if result.rps > 0:
        out["server_cpu_ms_per_request"] = round(cpu["server_cores"] / result.rps * 1e3, 3)
        loop = cpu.get("server_loop_cores")
        if loop is not None:  # the loop thread's share, and the other threads' and processes'
            out["server_loop_cpu_ms_per_request"] = round(loop / result.rps * 1e3, 3)
    if isinstance(result, LoadResult):
        out.update({k: round(v, 3) for k, v in result.extra.items()})
    return out


def brief(r: dict[str, Any]) -> str:
    p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
    text = f"{r['rps']:>8.1f} req/s  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
    text += f"  cores server {r['server_cores']:.2f}"
    if "server_loop_cores" in r:
        text += f" (loop {r['server_loop_cores']:.2f})"
    text += f" gen {r['generator_cores']:.2f}"
    if r.get("unfinished"):
        text += f"  unfinished {r['unfinished']:.0f}"
    return text


def settle(peer: Peer, busy_cores: float = 0.5, max_wait_s: float = 20.0) -> None:
    """Wait until ``peer`` is idle again, e.g. Ray still working off a backlog from the last
    run, so one system's leftovers do not land in the next system's measurement."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        before = peer.cpu_seconds()
        time.sleep(0.25)
        if (peer.cpu_seconds() - before) / 0.25 < busy_cores:
            return


def _post(address: tuple[str, int], path: str, body: bytes, header_length: int) -> Any:
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request("POST", path, body, oip_http_headers(header_length))
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise AnswerMismatch(f"{address}: HTTP {response.status}: {payload[:200]!r}")
        return orjson.loads(payload)
    finally:
        conn.close()


def session_runs(peer: Peer) -> tuple[float, float] | None:
    """(member calls, session runs) so far of a gateway's in-process members, from its
    `/metrics`; None for a server without those counts (Ray Serve, the no-op, an older tree)."""
    if not peer.name.startswith(("gateway", "baseline")):
        return None
    conn = http.client.HTTPConnection(*peer.http, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    if response.status != 200:
        return None
    calls: dict[tuple[str, str], float] = {}
    runs: dict[tuple[str, str], float] = {}
    wanted = {"ensemble_member_calls_total": calls, "ensemble_member_runs_total": runs}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            into = wanted.get(sample.name)
            if into is not None:
                key = (sample.labels["member"], sample.labels["tier"])
                into[key] = into.get(key, 0.0) + sample.value
    if not runs:
        return None
    return sum(calls.get(key, 0.0) for key in runs), sum(runs.values())


def check_answers(peers: dict[str, Peer], path: str, body: bytes, header_length: int) -> None:
    """The gateway and Ray Serve must return the same probabilities for the request we send."""
    answers = {name: _post(peer.http, path, body, header_length) for name, peer in peers.items()}

    def probabilities(doc: Any) -> np.ndarray:
        out = next(o for o in doc["outputs"] if o["name"] == "probabilities")
        return np.asarray(out["data"], dtype=np.float64)

    if "ray" in answers:
        gateway, ray = probabilities(answers["gateway"]), probabilities(answers["ray"])
        if not np.allclose(gateway, ray, atol=1e-5):
            raise AnswerMismatch(f"gateway answered {gateway}, Ray Serve {ray}")


def _at(doc: dict[str, Any], system: str, level: int) -> dict[str, Any] | None:
    value: dict[str, Any] | None = doc["closed_loop"].get(system, {}).get(str(level))
    return value


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not b["rps"]:
        return None
    return round(float(a["rps"]) / float(b["rps"]), 3)


def _cpu_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Server CPU per request of ``a`` over ``b``'s."""
    cpu_a = a.get("server_cpu_ms_per_request") if a else None
    cpu_b = b.get("server_cpu_ms_per_request") if b else None
    return round(cpu_a / cpu_b, 3) if cpu_a and cpu_b else None


def _workers(doc: dict[str, Any], ref: int, one: dict[str, Any] | None) -> dict[str, Any]:
    """The gateway of several workers against one worker, the no-op server and Ray Serve over
    HTTP at ``ref``, and the most cores it used at any level."""
    count = doc["plan"].get("workers", 1)
    rows = doc["closed_loop"].get(f"gateway{count}w-http", {})
    many = rows.get(str(ref))
    return {
        "workers": count,
        "workers_speedup": _ratio(many, one),
        "workers_vs_noop": _ratio(many, _at(doc, "noop-http", ref)),
        "workers_vs_ray_serve": _ratio(many, _at(doc, "ray-http", ref)),
        "workers_server_cores": max((r["server_cores"] for r in rows.values()), default=None),
    }


def _overhead(system: dict[str, Any] | None, floor: dict[str, Any] | None) -> float | None:
    if system is None or floor is None:
        return None
    return round(float(system["p50_ms"]) - float(floor["p50_ms"]), 3)


def finish(doc: dict[str, Any]) -> None:
    """Ratios, overheads, the generators' ceilings and the goals, from the measured rows."""
    levels = [int(c) for c in doc["plan"]["concurrency"]]
    ref = REFERENCE_CONCURRENCY if REFERENCE_CONCURRENCY in levels else max(levels)
    low = min(levels)
    gw, gw_grpc = _at(doc, "gateway-http", ref), _at(doc, "gateway-grpc", ref)
    doc["ratios"] = {
        "concurrency": ref,
        "throughput_vs_ray_serve": _ratio(gw, _at(doc, "ray-http", ref)),
        "throughput_vs_noop": _ratio(gw, _at(doc, "noop-http", ref)),
        "grpc_throughput_vs_ray_serve": _ratio(gw_grpc, _at(doc, "ray-http", ref)),
        "grpc_throughput_vs_noop_grpc": _ratio(gw_grpc, _at(doc, "noop-grpc", ref)),
        "grpc_cpu_vs_http": _cpu_ratio(gw_grpc, gw),
        **_workers(doc, ref, gw),
    }
    if "baseline-http" in doc["closed_loop"]:
        doc["vs_baseline"] = _vs_baseline(doc)
    floor, floor5 = doc.get("floor"), doc.get("floor_default5")
    doc["overhead_p50_ms_vs_floor"] = _overhead(_at(doc, "gateway-http", low), floor)
    doc["overheads_p50_ms_vs_floor"] = {
        "concurrency": low,
        "gateway-http": doc["overhead_p50_ms_vs_floor"],
        "gateway-grpc": _overhead(_at(doc, "gateway-grpc", low), floor),
        "ray-http": _overhead(_at(doc, "ray-http", low), floor),
        "gateway5-http vs its 5-member floor": _overhead(_at(doc, "gateway5-http", low), floor5),
    }
    noop = _at(doc, "noop-http", low)
    # The HTTP stack's own round trip: what any server here pays before any model work.
    doc["noop_http_p50_ms"] = noop["p50_ms"] if noop else None
    doc["generator_ceiling"] = _ceilings(doc)
    doc["goals"] = goals_doc(goals(doc))
    doc["machine"]["loadavg_at_end"] = list(os.getloadavg())


def _vs_baseline(doc: dict[str, Any]) -> dict[str, Any]:
    """The gateway against the baseline tree (``--baseline``) at every closed-loop level, per
    protocol: throughput and server CPU per request, each as gateway / baseline."""
    out: dict[str, Any] = {}
    for protocol in ("http", "grpc"):
        ours = doc["closed_loop"].get(f"gateway-{protocol}", {})
        theirs = doc["closed_loop"].get(f"baseline-{protocol}", {})
        for level in sorted(set(ours) & set(theirs), key=int):
            a, b = ours[level], theirs[level]
            cpu_a, cpu_b = a.get("server_cpu_ms_per_request"), b.get("server_cpu_ms_per_request")
            out[f"{protocol} c={level}"] = {
                "throughput": _ratio(a, b),
                "cpu_per_request": round(cpu_a / cpu_b, 3) if cpu_a and cpu_b else None,
            }
    return out


def _ceilings(doc: dict[str, Any]) -> dict[str, Any]:
    """The best no-op rate per generator and the generator's own cores there."""
    ceiling = {}
    for system, name in (("noop-http", "wrk_http"), ("noop-grpc", "grpc_aio")):
        rows = doc["closed_loop"].get(system, {})
        if rows:
            level, best = max(rows.items(), key=lambda kv: kv[1]["rps"])
            ceiling[name] = {
                "rps": best["rps"],
                "concurrency": int(level),
                "generator_cores": best["generator_cores"],
            }
    return ceiling


def goals(doc: dict[str, Any]) -> list[Goal]:
    # The overhead goal is at c=1: a run without that level does not judge it (n/a).
    at_one = doc["overheads_p50_ms_vs_floor"]["concurrency"] == 1
    measured = {**doc["ratios"], "overhead": doc["overhead_p50_ms_vs_floor"] if at_one else None}
    out = []
    for text, key, op, target in GOALS:
        value = measured[key]
        passed = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append(Goal(f"{text} {op} {target:g}", "", str(value), passed, {key: value}))
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if "skipped" in r:
        return "over capacity"
    if "p50_ms" not in r:
        return f"{r['rps']:.0f} (no answers)"
    return f"{r['rps']:.0f} ({r['p50_ms']:.2f}/{r['p99_ms']:.1f})"


def _loop_table(
    rows_by_system: dict[str, dict[str, Any]], keys: list[str], labels: list[str]
) -> str:
    header = ["system", *labels]
    body = [
        [system, *(_cell(rows.get(k)) for k in keys)] for system, rows in rows_by_system.items()
    ]
    return text_table(header, body)


def table(doc: Report) -> str:
    """The results as plain text: req/s (p50/p99 ms) per system and load level."""
    levels = [str(c) for c in doc["plan"]["concurrency"]]
    rates = [f"{r:g}" for r in doc["plan"]["open_loop_rates"]]
    lines = [
        f"benchmark {doc['started_at']}  {doc['command']}",
        f"machine: {doc['machine']['cpus']} cores, {doc['machine']['cpu']}",
        "",
        "closed loop: req/s (p50/p99 ms)",
        _loop_table(doc["closed_loop"], levels, [f"c={c}" for c in levels]),
        "",
        "open loop: achieved req/s (p50/p99 ms) at the offered rate",
        _loop_table(doc.get("open_loop", {}), rates, [f"{r}/s" for r in rates]),
    ]
    floor = doc.get("floor")
    if floor:
        lines += [
            "",
            f"floor ({'+'.join(floor['members'])} back to back, batch 1): "
            f"p50 {floor['p50_ms']:.3f} ms  p99 {floor['p99_ms']:.3f} ms",
        ]
    if doc.get("floor_default5"):
        f5 = doc["floor_default5"]
        lines.append(f"floor default5 ({len(f5['members'])} members): p50 {f5['p50_ms']:.3f} ms")
    lines += [
        "",
        f"ratios at c={doc['ratios']['concurrency']}: "
        + ", ".join(f"{k} {v}" for k, v in doc["ratios"].items() if k != "concurrency"),
        "p50 overhead over the floor (ms): "
        + ", ".join(
            f"{k} {v}" for k, v in doc["overheads_p50_ms_vs_floor"].items() if k != "concurrency"
        ),
        *(
            [
                "against the baseline tree (gateway / baseline): "
                + ", ".join(
                    f"{k}: throughput {v['throughput']}, CPU per request {v['cpu_per_request']}"
                    for k, v in doc["vs_baseline"].items()
                )
            ]
            if doc.get("vs_baseline")
            else []
        ),
        "generator ceiling: "
        + ", ".join(
            f"{k} {v['rps']:.0f} req/s at c={v['concurrency']} ({v['generator_cores']:.2f} cores)"
            for k, v in doc["generator_ceiling"].items()
        ),
        "",
        goal_lines(goals_of(doc)),
    ]
    return "\n".join(lines)


def render_markdown(doc: Report) -> str:
    """report.md: the printed table, as printed."""
    return f"# Benchmark\n\n```\n{table(doc)}\n```\n"
