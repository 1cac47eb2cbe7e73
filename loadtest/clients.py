"""OIP clients for the generator: HTTP JSON, HTTP binary tensors and gRPC, all pre-encoded."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from loadtest.httpclient import HttpPool, encode_request


class Answer(Protocol):
    """Called once per request: error kind or None, predicted labels (None when not checked),
    and whether the answer said `degraded` in its parameters."""

    def __call__(
        self, err: str | None, labels: Sequence[int] | None, degraded: bool = False, /
    ) -> None: ...


Params = dict[str, bool | int | float | str]


@dataclass(frozen=True)
class Workload:
    """The labelled samples requests carry, cut into batches of ``batch_size`` rows."""

    x: np.ndarray
    y: np.ndarray
    batch_size: int

    @property
    def batches(self) -> int:
        return len(self.x) // self.batch_size

    def rows(self, batch: int) -> np.ndarray:
        return self.x[batch * self.batch_size : (batch + 1) * self.batch_size]

    def labels(self, batch: int) -> list[int]:
        return [int(v) for v in self.y[batch * self.batch_size : (batch + 1) * self.batch_size]]


def load_workload(path: Path, batch_size: int) -> Workload:
    """Read ``X`` (float32 [n, features]) and ``y`` from an npz; ValueError if unusable."""
    with np.load(path) as data:
        if "X" not in data or "y" not in data:
            raise ValueError(f"{path}: needs arrays 'X' and 'y'")
        x = np.ascontiguousarray(data["X"], dtype=np.float32)
        y = np.asarray(data["y"]).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < batch_size:
        raise ValueError(f"{path}: X must be [n, features] with n >= batch_size and len(y) == n")
    return Workload(x, y, batch_size)


@dataclass(frozen=True)
class RequestShape:
    """What every client needs to know to build its requests."""

    model: str
    endpoint: str  # "infer" or "live"
    input: str
    output: str
    timeout_s: float
    classes: Sequence[Params]
    feedback_share: float = 0.0
    """Share of answered requests whose true labels are posted to the feedback API (0: none)."""
    seed: int = 0
    """Seeds the choice of which answers get feedback."""
    feedback_token: str | None = None
    """The gateway's feedback token, sent as `Authorization: Bearer` with each post."""


class InferClient(Protocol):
    """A protocol client. ``submit`` never calls ``answer`` before it returns."""

    error_samples: dict[str, str]
    """First error message seen per error kind, for the report."""

    feedback: dict[str, int]
    """Feedback posts by outcome: `sent`, `accepted`, and error kinds (`http_404`, `timeout`,
    `no_feedback_id`: an answer carried none to post with)."""

    async def start(self) -> None: ...

    async def check(self) -> str | None:
        """None when the target answers and the model is ready, else what is wrong."""
        ...

    def submit(self, klass: int, batch: int, answer: Answer) -> None: ...

    def queued(self) -> int:
        """Requests that had to wait for a free connection so far."""
        ...

    async def close(self) -> None: ...


def _error_text(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        text = str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace")
    return text[:300]


class FeedbackSender:
    """Posts the true labels of a share of the answers, joined by the `feedback_id` each answer
    carried, with the gateway's feedback token. Feedback goes over a pool of its own, so it
    never takes a connection a measured request is waiting for."""

    def __init__(
        self,
        hostport: str,
        model: str,
        share: float,
        seed: int,
        labels: Sequence[Sequence[int]],
        token: str | None = None,
    ) -> None:
        self.hostport = hostport
        self.path = f"/v2/models/{model}/feedback"
        self.share = share
        self.rng = random.Random(seed)
        self.labels = labels
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.counts: dict[str, int] = {}
        self.pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.pool: HttpPool | None = None

    def answered(self, feedback_id: object, batch: int) -> None:
        """A request was answered: post its labels if it is among the chosen share."""
        if self.share < 1.0 and self.rng.random() >= self.share:
            return
        if not isinstance(feedback_id, str) or not feedback_id:
            # A gateway without its feedback token issues no ids: nothing can be posted.
            self.counts["no_feedback_id"] = self.counts.get("no_feedback_id", 0) + 1
            return
        body = orjson.dumps({"feedback_id": feedback_id, "label": list(self.labels[batch])})
        raw = encode_request("POST", self.hostport, self.path, body, self.headers)
        assert self.pool is not None
        self.counts["sent"] = self.counts.get("sent", 0) + 1
        self.pending += 1
        self.idle.clear()
        self.pool.send(raw, self._done)

    def _done(self, status: int, _hlen: int | None, _body: bytes, err: str | None) -> None:
        kind = err or ("accepted" if status == 200 else f"http_{status}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.pending -= 1
        if not self.pending:
            self.idle.set()

    async def close(self, timeout_s: float) -> None:
        """Wait (bounded) for posts in flight, then drop the connections."""
        if self.pending:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout_s)
            except TimeoutError:
                self.counts["unfinished"] = self.counts.get("unfinished", 0) + self.pending
                self.pending = 0
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


class _HttpBase:
    """Shared by the JSON and binary HTTP clients: the pool, checks and status handling."""

    content_type = "application/json"

    def __init__(self, url: str, shape: RequestShape, work: Workload, connections: int) -> None:
        hostport = url.removeprefix("http://")
        host, _, port = hostport.rpartition(":")
        self.host, self.port, self.hostport = host.strip("[]"), int(port), hostport
        self.shape = shape
        self.connections = connections
        self.error_samples: dict[str, str] = {}
        self.feedback: dict[str, int] = {}
        self.sender: FeedbackSender | None = None
        if shape.feedback_share > 0 and shape.endpoint == "infer":
            labels = [work.labels(b) for b in range(work.batches)]
            self.sender = FeedbackSender(
                hostport,
                shape.model,
                shape.feedback_share,
                shape.seed,
                labels,
                shape.feedback_token,
            )
            self.feedback = self.sender.counts
        if shape.endpoint == "live":
            live = encode_request("GET", hostport, "/v2/health/live")
            self.payloads = [[live] for _ in shape.classes]
        else:
            path = f"/v2/models/{shape.model}/infer"
            self.payloads = [
                [self._encode(path, work.rows(b), params) for b in range(work.batches)]
                for params in shape.classes
            ]
        self.pool: HttpPool | None = None

    def _encode(self, path: str, rows: np.ndarray, params: Params) -> bytes:
        raise NotImplementedError

    def _header(self, params: Params) -> dict[str, Any]:
        """The request's JSON fields besides inputs and outputs: `parameters`."""
        return {"parameters": params} if params else {}

    async def start(self) -> None:
        self.pool = HttpPool(self.host, self.port, self.connections, self.shape.timeout_s)
        await self.pool.connect(min(self.connections, 32))
        if self.sender is not None:
            pool = HttpPool(self.host, self.port, self.connections, self.shape.timeout_s)
            self.sender.pool = pool
            await pool.connect(1)

    async def check(self) -> str | None:
        assert self.pool is not None
        path = "/v2/health/live" if self.shape.endpoint == "live" else None
        path = path or f"/v2/models/{self.shape.model}/ready"
        future: asyncio.Future[tuple[int, bytes, str | None]] = asyncio.Future()
        self.pool.send(
            encode_request("GET", self.hostport, path),
            lambda status, _h, body, err: future.set_result((status, body, err)),
        )
        status, body, err = await future
        if err is not None:
            return f"GET {path} on {self.hostport}: {err}"
        return None if status == 200 else f"GET {path}: HTTP {status} {_error_text(body)}"

    def submit(self, klass: int, batch: int, answer: Answer) -> None:
        assert self.pool is not None
        payloads = self.payloads[klass]
        index = batch % len(payloads)
        self.pool.send(
            payloads[index],
            lambda status, hlen, body, err: self._answer(status, hlen, body, err, answer, index),
        )

    def _answer(
        self,
        status: int,
        hlen: int | None,
        body: bytes,
        err: str | None,
        answer: Answer,
        batch: int = 0,
    ) -> None:
        if err is not None:
            answer(err, None)
        elif status != 200:
            kind = f"http_{status}"
            if kind not in self.error_samples:
                self.error_samples[kind] = _error_text(body)
            answer(kind, None)
        elif self.shape.endpoint == "live":
            answer(None, None)
        else:
            try:
                labels, params = self._labels(hlen, body)
            except (ValueError, KeyError, TypeError, struct.error) as exc:
                self.error_samples.setdefault("bad_response", str(exc)[:300])
                answer("bad_response", None)
                return
            answer(None, labels, params.get("degraded") is True)
            if self.sender is not None:  # after the answer is recorded: posting adds no latency
                self.sender.answered(params.get("feedback_id"), batch)

    def _labels(self, hlen: int | None, body: bytes) -> tuple[list[int], dict[str, Any]]:
        """The answer's labels and its parameters (`degraded`, `feedback_id`, ...)."""
        doc = orjson.loads(body)
        for out in doc["outputs"]:
            if out["name"] == self.shape.output:
                return [int(v) for v in out["data"]], _parameters(doc)
        raise KeyError(f"no output {self.shape.output!r} in the answer")

    def queued(self) -> int:
        return self.pool.queued if self.pool is not None else 0

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.sender is not None:
            await self.sender.close(self.shape.timeout_s)


def _parameters(doc: dict[str, Any]) -> dict[str, Any]:
    """An OIP answer's parameters: `degraded` (the gateway's contract check), `feedback_id`."""
    params = doc.get("parameters")
    return params if isinstance(params, dict) else {}


class HttpJsonClient(_HttpBase):
    """OIP REST with tensors as JSON arrays."""

    def _encode(self, path: str, rows: np.ndarray, params: Params) -> bytes:
        doc: dict[str, Any] = {
            **self._header(params),
            "inputs": [
                {"name": self.shape.input, "datatype": "FP32", "shape": list(rows.shape),
                 "data": rows.ravel()}
            ],
            "outputs": [{"name": self.shape.output, "parameters": {"binary_data": False}}],
        }  # fmt: skip
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json"}
        return encode_request("POST", self.hostport, path, body, headers)


_BINARY_FORMATS = {"INT64": "q", "INT32": "i", "INT16": "h", "INT8": "b", "UINT8": "B"}


class HttpBinaryClient(_HttpBase):
    """OIP REST with the binary tensor extension, both ways."""

    def _encode(self, path: str, rows: np.ndarray, params: Params) -> bytes:
        blob = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        doc: dict[str, Any] = {
            **self._header(params),
            "inputs": [
                {"name": self.shape.input, "datatype": "FP32", "shape": list(rows.shape),
                 "parameters": {"binary_data_size": len(blob)}}
            ],
            "outputs": [{"name": self.shape.output, "parameters": {"binary_data": True}}],
        }  # fmt: skip
        header = orjson.dumps(doc)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        return encode_request("POST", self.hostport, path, header + blob, headers)

    def _labels(self, hlen: int | None, body: bytes) -> tuple[list[int], dict[str, Any]]:
        if hlen is None:
            return super()._labels(None, body)  # the server answered in JSON after all
        doc = orjson.loads(body[:hlen])
        offset = hlen
        for out in doc["outputs"]:
            size = int(out.get("parameters", {}).get("binary_data_size", 0))
            if out["name"] == self.shape.output:
                if "data" in out:
                    return [int(v) for v in out["data"]], _parameters(doc)
                code = _BINARY_FORMATS[out["datatype"]]
                count = size // struct.calcsize(code)
                labels = list(struct.unpack_from(f"<{count}{code}", body, offset))
                return labels, _parameters(doc)
            offset += size
        raise KeyError(f"no output {self.shape.output!r} in the answer")


class GrpcClient:
    """OIP gRPC through tritonclient.grpc.aio, with each request's inputs built once."""

    def __init__(self, target: str, shape: RequestShape, work: Workload) -> None:
        import tritonclient.grpc as grpcclient

        if shape.feedback_share > 0:
            # The scenario rejects this; a programmatic caller must not get silence either.
            raise ValueError("feedback is HTTP only: the gateway has no gRPC feedback call")
        self.target = target
        self.shape = shape
        self.error_samples: dict[str, str] = {}
        self.feedback: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outputs = [grpcclient.InferRequestedOutput(shape.output)]
        self._inputs = []
        if shape.endpoint == "infer":
            for b in range(work.batches):
                rows = work.rows(b)
                tensor = grpcclient.InferInput(shape.input, list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows)
                self._inputs.append([tensor])
        # Triton's client carries priority and timeout in dedicated request fields.
        self._kwargs: list[dict[str, Any]] = []
        for params in shape.classes:
            rest = {k: v for k, v in params.items() if k not in ("priority", "timeout")}
            kwargs: dict[str, Any] = {"parameters": rest or None}
            if "priority" in params:
                kwargs["priority"] = params["priority"]
            if "timeout" in params:
                kwargs["timeout"] = params["timeout"]
            self._kwargs.append(kwargs)
        self.client: Any = None

    async def start(self) -> None:
        import tritonclient.grpc.aio as aio

        self.client = aio.InferenceServerClient(self.target)

    async def check(self) -> str | None:
        from tritonclient.utils import InferenceServerException

        try:
            if self.shape.endpoint == "live":
                ok = await self.client.is_server_live(client_timeout=self.shape.timeout_s)
            else:
                ok = await self.client.is_model_ready(self.shape.model)
        except InferenceServerException as exc:
            return f"gRPC {self.target}: {exc.status()} {exc.message()}"
        return None if ok else f"gRPC {self.target}: model {self.shape.model!r} is not ready"

    def submit(self, klass: int, batch: int, answer: Answer) -> None:
        task = asyncio.get_running_loop().create_task(self._call(klass, batch, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, klass: int, batch: int, answer: Answer) -> None:
        from tritonclient.utils import InferenceServerException

        start = time.monotonic()
        timeout = self.shape.timeout_s
        try:
            if self.shape.endpoint == "live":
                await self.client.is_server_live(client_timeout=timeout)
                answer(None, None)
                return
            result = await self.client.infer(
                self.shape.model,
                self._inputs[batch % len(self._inputs)],
                outputs=self._outputs,
                client_timeout=timeout,
                **self._kwargs[klass],
            )
        except InferenceServerException as exc:
            code = str(exc.status() or "UNKNOWN").removeprefix("StatusCode.")
            late = time.monotonic() - start >= timeout * 0.99
            kind = "timeout" if code == "DEADLINE_EXCEEDED" and late else f"grpc_{code}"
            self.error_samples.setdefault(kind, str(exc.message())[:300])
            answer(kind, None)
            return
        labels = result.as_numpy(self.shape.output)
        if labels is None:
            self.error_samples.setdefault("bad_response", f"no output {self.shape.output!r}")
            answer("bad_response", None)
            return
        flag = result.get_response().parameters.get("degraded")
        answer(None, [int(v) for v in labels.ravel()], flag is not None and flag.bool_param)

    def queued(self) -> int:
        return 0

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()


def make_client(
    protocol: str,
    url: str | None,
    grpc: str | None,
    shape: RequestShape,
    work: Workload,
    connections: int,
) -> InferClient:
    if protocol == "grpc":
        assert grpc is not None
        return GrpcClient(grpc, shape, work)
    assert url is not None
    cls = HttpJsonClient if protocol == "http_json" else HttpBinaryClient
    return cls(url, shape, work, connections)
