"""The abuse harness's attacks: each bounded in time and count, loopback only."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import random
import resource
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc


@dataclass(frozen=True)
class Target:
    """The gateway under attack, and what the harness knows about it."""

    http_url: str
    grpc_target: str
    config: Path
    admin_token: str
    feedback_token: str
    learning_profile: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.http_url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port


Outcome = dict[str, Any]
Attack = Callable[[Target, float], Outcome]
"""An attack: the target and its time budget in seconds -> what it saw."""

INFER = "/v2/models/digits/infer"


def _statuses(results: list[str]) -> dict[str, int]:
    return dict(Counter(results).most_common())


def _flood(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    parallel: int,
    rate: float,
    budget_s: float,
) -> Outcome:
    """``parallel`` clients each posting ``body`` to the infer route ``rate`` times a second (or
    as fast as the answers come) for ``budget_s``; the answers' statuses."""
    end = time.monotonic() + budget_s

    def worker() -> list[str]:
        seen: list[str] = []
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < end and len(seen) < 10_000:
                started = time.monotonic()
                try:
                    r = client.post(target.http_url + INFER, content=body, headers=headers)
                    seen.append(f"http_{r.status_code}")
                except httpx.HTTPError as exc:
                    seen.append(type(exc).__name__)
                time.sleep(max(0.0, started + 1 / rate - time.monotonic()))
        return seen

    with ThreadPoolExecutor(parallel) as pool:
        results = [r for batch in pool.map(lambda _: worker(), range(parallel)) for r in batch]
    return {"body_bytes": len(body), "sent": len(results), "answers": _statuses(results)}


GZIP_JSON = {"content-encoding": "gzip", "content-type": "application/json"}


def amplification(target: Target, budget_s: float) -> Outcome:
    """4 clients, 10 requests a second each, sending a 58 kB gzip body that inflates to a
    60 MB JSON array of 30 million numbers declared as shape [1, 64]."""
    body = gzip.compress(
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":['
        + b"0," * 29_999_999
        + b"0]}]}",
        9,
    )
    return _flood(target, body, GZIP_JSON, 4, 10, budget_s)


def gzip_bombs(target: Target, budget_s: float) -> Outcome:
    """8 clients, 2 requests a second each, sending an 81 kB gzip body inflating to 80 MiB of
    zeros."""
    body = gzip.compress(b"\0" * (80 * 1024 * 1024), 9)
    return _flood(target, body, GZIP_JSON, 8, 2, budget_s)


def big_json(target: Target, budget_s: float) -> Outcome:
    """4 clients, 2 requests a second each, sending 30 MB of plain JSON (15 million numbers)
    declared as [1, 64]."""
    body = (
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":['
        + b"0," * 14_999_999
        + b"0]}]}"
    )
    return _flood(target, body, {"content-type": "application/json"}, 4, 2, budget_s)


def _hold(address: tuple[str, int], source: str, count: int, hold_s: float, conn: Any) -> None:
    """Open ``count`` idle connections from ``source`` and hold them ``hold_s``; report how
    many opened and how many the server closed."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(count):
        s = socket.socket()
        s.settimeout(1.0)
        try:
            s.bind((source, 0))
            s.connect(address)
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    conn.send("opened")
    time.sleep(hold_s)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1024) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    conn.send({"opened": len(socks), "failed": failed, "closed_by_server": closed})


def idle_connections(target: Target, budget_s: float) -> Outcome:
    """25,000 TCP connections opened and held without sending a byte (two processes, from
    127.0.0.2 and 127.0.0.3: one process may hold 20,000 descriptors here)."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for source in ("127.0.0.2", "127.0.0.3"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_hold, args=(target.address, source, 12_500, budget_s, child))
        proc.start()
        child.close()  # the child process holds its own end
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        pipe.poll(120)
        pipe.recv()
    held_from = time.time()  # every connection is open (or failed to): the holding starts
    reports = []
    for pipe, proc in zip(pipes, procs, strict=True):
        pipe.poll(budget_s + 120)
        reports.append(pipe.recv())
        pipe.close()
        proc.join(30)
    counts = {k: sum(r[k] for r in reports) for k in ("opened", "failed", "closed_by_server")}
    return {**counts, "held_from": held_from}


def slow_headers(target: Target, budget_s: float) -> Outcome:
    """1,000 connections sending a request head one byte a second (slowloris)."""
    head = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    socks = []
    for _ in range(1000):
        s = socket.create_connection(target.address, timeout=1.0)
        s.setblocking(False)
        socks.append(s)
    started = time.monotonic()
    closed_after: list[float] = []
    alive = list(socks)
    for i in range(int(budget_s)):
        still = []
        for s in alive:
            try:
                s.send(head[i : i + 1])
                if s.recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                still.append(s)
            except OSError:
                closed_after.append(time.monotonic() - started)
        alive = still
        time.sleep(max(0.0, started + i + 1 - time.monotonic()))
    for s in socks:
        s.close()
    closed_after.sort()
    return {
        "connections": len(socks),
        "closed_by_server": len(closed_after),
        "closed_after_s_p50": round(closed_after[len(closed_after) // 2], 1)
        if closed_after
        else None,
    }


def _answer(client: httpx.Client, target: Target, x: np.ndarray, request_id: str) -> dict[str, Any]:
    doc = {
        "id": request_id,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.tolist()}],
        "parameters": {"policy": target.learning_profile},
    }
    r = client.post(target.http_url + INFER, json=doc)
    r.raise_for_status()
    return dict(r.json())


def _weights(client: httpx.Client, target: Target) -> dict[str, float]:
    text = client.get(target.http_url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("ensemble_selection_weight{") and target.learning_profile in line:
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def feedback_forgery(target: Target, budget_s: float) -> Outcome:
    """500 false labels posted without the feedback token (and 500 with a wrong one) to
    answers of the learning profile; the learned weights before and after."""
    url = target.http_url + "/v2/models/digits/feedback"
    statuses: list[str] = []
    rng = random.Random(0)
    with httpx.Client(timeout=30) as client:
        x = np.zeros(64, np.float32)
        ids = [
            _answer(client, target, x, "same")["parameters"].get("feedback_id") for _ in range(5)
        ]
        before = _weights(client, target)  # after the answers: the profile has weights now
        end = time.monotonic() + budget_s
        for i in range(1000):
            if time.monotonic() > end:
                break
            doc = {"feedback_id": ids[i % len(ids)] or "x", "label": rng.randrange(10)}
            headers = {} if i % 2 == 0 else {"authorization": "Bearer wrong-token"}
            statuses.append(f"http_{client.post(url, json=doc, headers=headers).status_code}")
        after = _weights(client, target)
    return {
        "sent": len(statuses),
        "answers": _statuses(statuses),
        "weights_changed": before != after,
        "weights": len(after),
    }


def reused_ids(target: Target, budget_s: float) -> Outcome:
    """Two clients send the same request id with different inputs; each labels its own answer
    (with the token). A label must join the answer it was issued for, never the other one."""
    data = np.load(Path(__file__).resolve().parents[1] / "models" / "digits" / "test.npz")
    xs, ys = data["X"].astype(np.float32), data["y"]
    a, b = (
        next(i for i in range(len(ys)) if ys[i] == 0),
        next(i for i in range(len(ys)) if ys[i] == 1),
    )
    url = target.http_url + "/v2/models/digits/feedback"
    auth = {"authorization": f"Bearer {target.feedback_token}"}
    with httpx.Client(timeout=30) as alice, httpx.Client(timeout=30) as bob:
        ans_a = _answer(alice, target, xs[a], "shared-id")
        ans_b = _answer(bob, target, xs[b], "shared-id")
        fid_a, fid_b = ans_a["parameters"]["feedback_id"], ans_b["parameters"]["feedback_id"]
        joined_b = bob.post(url, json={"feedback_id": fid_b, "label": int(ys[b])}, headers=auth)
        again_a = alice.post(url, json={"feedback_id": fid_a, "label": int(ys[a])}, headers=auth)
    members = joined_b.json().get("members", {}) if joined_b.status_code == 200 else {}
    return {
        "ids_echoed": ans_a.get("id") == ans_b.get("id") == "shared-id",
        "feedback_ids_distinct": fid_a != fid_b,
        "bob_label": f"http_{joined_b.status_code}",
        "alice_label": f"http_{again_a.status_code}",
        "bob_members_right": sum(1 for v in members.values() if v),
        "members": len(members),
    }


def long_strings(target: Target, budget_s: float) -> Outcome:
    """A 10 MB input name, a 10 MB request id, a 1 MB model name in the path."""
    big = "x" * 10_000_000
    sizes: dict[str, tuple[object, int]] = {}
    with httpx.Client(timeout=60) as client:
        doc: dict[str, Any] = {
            "inputs": [{"name": big, "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]
        }
        r = client.post(target.http_url + INFER, json=doc)
        sizes["input_name"] = (r.status_code, len(r.content))
        doc = {
            "id": big,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}],
        }
        r = client.post(target.http_url + INFER, json=doc)
        sizes["id"] = (r.status_code, len(r.content))
    head = b"GET /v2/models/" + b"m" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    sizes["model_name"] = _raw_exchange(target.address, head)
    return {k: f"{status}, {size} bytes" for k, (status, size) in sizes.items()}


def _raw_exchange(address: tuple[str, int], request: bytes) -> tuple[str, int]:
    """Send raw bytes (what an HTTP client library refuses to build); the answer's status and
    size, read until the server closes or 5 s pass."""
    with socket.create_connection(address, timeout=5.0) as s:
        try:
            s.sendall(request)
        except OSError as exc:  # the server may close before it has read everything
            return type(exc).__name__, 0
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
    return f"http_{status}", len(answer)


def non_finite(target: Target, budget_s: float) -> Outcome:
    """NaN and infinity as binary tensors (HTTP, ensemble and member routes) and typed gRPC
    contents; the availability violations counted before and after."""
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = np.nan
    blob = x.tobytes()
    header = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                     "parameters": {"binary_data_size": len(blob)}}]}
    ).encode()  # fmt: skip
    headers = {"inference-header-content-length": str(len(header))}
    seen = {}
    with httpx.Client(timeout=30) as client:
        before = _availability(client, target)
        for route in ("digits", "logreg"):
            r = client.post(
                f"{target.http_url}/v2/models/{route}/infer", content=header + blob, headers=headers
            )
            seen[f"http {route}"] = f"http_{r.status_code}"
        with grpc.insecure_channel(target.grpc_target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            values = [float("inf")] + [0.0] * 63
            request = service_pb2.ModelInferRequest(
                model_name="digits",
                inputs=[{"name": "input", "datatype": "FP32", "shape": [1, 64],
                         "contents": {"fp32_contents": values}}],
            )  # fmt: skip
            try:
                stub.ModelInfer(request, timeout=10)
                seen["grpc digits"] = "OK"
            except grpc.RpcError as exc:
                seen["grpc digits"] = exc.code().name
        after = _availability(client, target)
    return {**seen, "availability_violations_added": after - before}


def _availability(client: httpx.Client, target: Target) -> float:
    text = client.get(target.http_url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ensemble_contract_violations_total{") and 'kind="availability"' in line
    )


def model_swap(target: Target, budget_s: float) -> Outcome:
    """A member's ONNX file replaced by another with the same inputs and outputs, then a hot
    reload; the file is put back afterwards."""
    svm = target.config.parents[1] / "models" / "digits" / "svm.onnx"
    saved = svm.with_suffix(".saved")
    shutil.copyfile(svm, saved)
    try:
        shutil.copyfile(svm.with_name("logreg.onnx"), svm)
        with httpx.Client(timeout=60) as client:
            r = client.put(
                target.http_url + "/admin/config",
                headers={"authorization": f"Bearer {target.admin_token}"},
            )
            x = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
            still = client.post(target.http_url + INFER, json={"inputs": [x]})
        answer = r.json()
        return {
            "reload": f"http_{r.status_code}",
            "message": str((answer.get("errors") or [answer.get("error", "")])[0])[:240],
            "old_config_serves": still.status_code == 200,
        }
    finally:
        shutil.move(saved, svm)


def baseline(target: Target, budget_s: float) -> Outcome:
    """No attack: what the probe clients see on their own, for comparison."""
    time.sleep(budget_s)
    return {}


ATTACKS: dict[str, Attack] = {
    "baseline": baseline,
    "amplification": amplification,
    "gzip_bombs": gzip_bombs,
    "big_json": big_json,
    "idle_connections": idle_connections,
    "slow_headers": slow_headers,
    "feedback_forgery": feedback_forgery,
    "reused_ids": reused_ids,
    "long_strings": long_strings,
    "non_finite": non_finite,
    "model_swap": model_swap,
}
