"""`ensemble loadtest` end to end: real gateways, all three protocols, exit codes, report files."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.httpclient import HttpPool, encode_request
from tests.integration.process import ROOT, GatewayProcess

LOCAL_CONFIG = ROOT / "configs" / "local.yaml"
"""The quickstart ensemble without Ray: these tests are about the harness."""
pytestmark = pytest.mark.integration
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loadtest(
    tmp_path: Path, scenario: dict[str, Any]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble.cli", "loadtest", str(path), "--out", str(out), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc, out


def report_of(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def assert_report_files(out: Path) -> None:
    report_of(out)
    assert (out / "report.md").read_text().startswith("# Load test")
    for name in ("latency.png", "throughput.png", "accuracy.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_harness_served_gateway_with_a_pause_fault(zoo_dir: Path, tmp_path: Path) -> None:
    scenario = {
        "target": {"config": str(LOCAL_CONFIG)},
        "protocol": "http_binary",
        "request": {"timeout_s": 0.5},
        "load": {"shape": "constant", "rps": 40, "duration_s": 3},
        "slo": {"latency_ms": {"p50": 5000}, "max_error_rate": 0.6, "min_accuracy": 0.9},
        "faults": [
            {"at_s": 0.5, "name": "log", "params": {"message": "before"}},
            {"at_s": 1.0, "name": "pause", "params": {"duration_s": 1.0}},
        ],
    }
    proc, out = loadtest(tmp_path, scenario)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout
    assert_report_files(out)
    report = report_of(out)
    assert report["requests"]["sent"] == 120
    assert report["accuracy"] >= 0.9
    assert report["target"]["harness_started"] and report["target"]["gateway_exit_code"] == 0
    assert [f["message"] for f in report["faults"]] == [
        "before",
        "gateway paused (SIGSTOP) for 1 s",
        "gateway resumed (SIGCONT)",
    ]
    # Requests sent into the frozen gateway waited past the 0.5 s client timeout.
    assert report["errors"].get("timeout", 0) > 0
    assert report["latency_ms"]["max"] >= 300
    assert {"p50", "p95", "p99", "max"} <= set(report["latency_ms"])
    assert len(report["timeline"]) >= 3
    assert "Traceback" not in (out / "gateway.log").read_text()


def test_failing_slo_exits_1_over_http_json(gateway: GatewayProcess, tmp_path: Path) -> None:
    scenario = {
        "target": {"url": gateway.http_url},
        "protocol": "http_json",
        "load": {"shape": "constant", "rps": 30, "duration_s": 2},
        "slo": {"latency_ms": {"p50": 0.001}, "min_accuracy": 0.9},
    }
    proc, out = loadtest(tmp_path, scenario)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL latency p50" in proc.stdout
    report = report_of(out)
    assert report["slo"]["passed"] is False
    assert [c["passed"] for c in report["slo"]["checks"]] == [False, True]
    assert report["requests"]["sent"] == 60 and report["errors"] == {}
    assert_report_files(out)


def test_passing_slo_exits_0_over_grpc(gateway: GatewayProcess, tmp_path: Path) -> None:
    scenario = {
        "target": {"grpc": gateway.grpc_target},
        "protocol": "grpc",
        "load": {"shape": "poisson", "rps": 30, "duration_s": 2},
        "mix": [
            {"name": "fast", "weight": 2, "parameters": {"priority": 1, "timeout": 10_000_000}},
            {"name": "vote", "weight": 1, "parameters": {"policy": "vote"}},
        ],
        "slo": {"latency_ms": {"p99": 5000}, "max_error_rate": 0.0, "min_accuracy": 0.9},
    }
    proc, out = loadtest(tmp_path, scenario)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(out)
    assert report["errors"] == {} and report["accuracy"] >= 0.9
    assert [c["name"] for c in report["classes"]] == ["fast", "vote"]
    assert sum(c["requests"] for c in report["classes"]) == report["requests"]["sent"] > 20


@pytest.mark.slow
def test_two_generator_processes_merge(gateway: GatewayProcess, tmp_path: Path) -> None:
    scenario = {
        "target": {"url": gateway.http_url},
        "generators": 2,
        "load": {"shape": "constant", "rps": 50, "duration_s": 2},
        "slo": {"min_accuracy": 0.9},
    }
    proc, out = loadtest(tmp_path, scenario)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(out)
    assert report["requests"]["sent"] == 100 and report["generator"]["processes"] == 2
    assert sum(row["sent"] for row in report["timeline"]) == 100


def test_closed_loop_on_the_liveness_route(gateway: GatewayProcess, tmp_path: Path) -> None:
    scenario = {
        "target": {"url": gateway.http_url},
        "request": {"endpoint": "live"},
        "load": {"shape": "closed", "concurrency": 8, "duration_s": 1},
    }
    proc, out = loadtest(tmp_path, scenario)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(out)
    assert report["requests"]["answered"] > 100 and report["accuracy"] is None
    assert "no SLO checks defined" in proc.stdout


def test_invalid_scenario_exits_2_naming_the_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('target: {url: "http://127.0.0.1:1"}\nload:\n  shape: poisson\n  rsp: 5\n')
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble.cli", "loadtest", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{path}:4:3: load.rsp: unknown key 'rsp'; did you mean 'rps'?" in proc.stderr
    assert f"{path}: load.duration_s: required key is missing" in proc.stderr.replace(
        f"{path}:2:1:", f"{path}:"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_unreachable_target_exits_2(tmp_path: Path) -> None:
    scenario = {
        "target": {"url": f"http://127.0.0.1:{free_port()}"},
        "load": {"shape": "constant", "rps": 1, "duration_s": 1},
    }
    proc, _ = loadtest(tmp_path, scenario)
    assert proc.returncode == 2
    assert "cannot run" in proc.stderr and "connection" in proc.stderr


def test_pool_reports_timeouts_and_refused_connections() -> None:
    async def scenario() -> list[str | None]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers; returns when the client gives up
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        kinds: list[str | None] = []
        done = asyncio.Event()

        def record(status: int, hlen: int | None, body: bytes, err: str | None) -> None:
            kinds.append(err)
            if len(kinds) == 3:
                done.set()

        pool = HttpPool("127.0.0.1", port, size=2, timeout_s=0.2)
        for _ in range(2):
            pool.send(encode_request("GET", "h", "/"), record)
        refused = HttpPool("127.0.0.1", free_port(), size=1, timeout_s=5)
        refused.send(encode_request("GET", "h", "/"), record)
        await asyncio.wait_for(done.wait(), 10)
        await pool.close()
        await refused.close()
        server.close()
        await server.wait_closed()
        return kinds

    assert sorted(asyncio.run(scenario()), key=str) == ["connection", "timeout", "timeout"]


def _noop_server(conn: Any) -> None:
    """A canned-200 HTTP/1.1 server on uvloop, far cheaper per request than the generator."""
    import uvloop

    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    class Noop(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(reply * data.count(b"\r\n\r\n"))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Noop, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.to_thread(conn.recv)  # until the test says stop

    uvloop.run(serve())


@pytest.mark.slow
def test_generator_ceiling_against_a_noop_server(zoo_dir: Path, tmp_path: Path) -> None:
    """The HTTP generator's own ceiling: closed loop against a server that costs ~nothing."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_noop_server, args=(child,))
    server.start()
    try:
        assert parent.poll(60)
        port = parent.recv()
        scenario = {
            "target": {"url": f"http://127.0.0.1:{port}"},
            "request": {"endpoint": "live"},
            "load": {"shape": "closed", "concurrency": 64, "duration_s": 3},
        }
        proc, out = loadtest(tmp_path, scenario)
    finally:
        parent.send("stop")
        server.join(30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(out)
    gen = report["generator"]
    print(
        f"\ngenerator ceiling (HTTP, closed loop x64, no-op server): "
        f"{report['throughput_rps']:.0f} req/s, CPU {gen['cpu_percent']}% of a core, "
        f"{gen['cpu_us_per_request']} us per request"
    )
    assert report["errors"] == {}
    assert report["throughput_rps"] > 1000


def test_cpu_cost_counts_the_gateways_process_tree(zoo_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.cpu_cost",
            str(LOCAL_CONFIG),
            "--requests",
            "40",
            "--concurrency",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first, *rows = done.stdout.splitlines()
    assert "40 requests at concurrency 2" in first and "0 failed" in first
    total = float(rows[-1].split()[2])
    assert rows[-1].startswith("  all processes") and total > 0
    assert (tmp_path / "cpu_cost-gateway.log").is_file()
