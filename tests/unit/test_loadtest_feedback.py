"""The harness's feedback: scenario setting, feedback ids and token, label posts, the report."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from ensemble.dataplane.feedback import parse_body
from ensemble.oip.rest import decode_infer_request
from loadtest.cli import provide_feedback_token
from loadtest.clients import (
    FeedbackSender,
    GrpcClient,
    HttpBinaryClient,
    HttpJsonClient,
    RequestShape,
    Workload,
)
from loadtest.fleet import Job, LocalFleet, ProcessFleet
from loadtest.report import RunInfo, build_report, render_markdown
from loadtest.runner import GeneratorResult, Records
from loadtest.scenario import ScenarioError, load_scenario, parse_scenario

X = np.arange(6 * 64, dtype=np.float32).reshape(6, 64) / 11
Y = np.array([3, 1, 4, 1, 5, 9])
WORK = Workload(X, Y, batch_size=2)
CLASSES = [{}, {"policy": "vote", "timeout": 5000}]

BASE = """\
target: {url: "http://127.0.0.1:8000"}
load: {shape: poisson, rps: 10, duration_s: 5}
"""


TOKEN = "lt-feedback-token"


def shape(share: float = 1.0, seed: int = 0) -> RequestShape:
    return RequestShape("digits", "infer", "input", "label", 5.0, CLASSES, share, seed, TOKEN)


def split_http(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return first, headers, body


def scenario_errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return info.value.errors


# --- the scenario setting --------------------------------------------------------------------


def test_feedback_is_off_by_default_and_share_defaults_to_all(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    assert load_scenario(path).feedback is None
    path.write_text(BASE + "feedback: {}\n")
    sc = load_scenario(path)
    assert sc.feedback is not None and sc.feedback.share == 1.0
    assert sc.feedback.token_env == "ENSEMBLE_FEEDBACK_TOKEN"
    path.write_text(BASE + "feedback: {share: 0.25, token_env: MY_TOKEN}\n")
    sc = load_scenario(path)
    assert sc.feedback is not None and sc.feedback.share == 0.25
    assert sc.feedback.token_env == "MY_TOKEN"


def test_feedback_unknown_key_and_bad_share_are_located_errors(tmp_path: Path) -> None:
    errors = scenario_errors(tmp_path, BASE + "feedback:\n  shar: 0.5\n")
    assert errors == [
        f"{tmp_path / 's.yaml'}:4:3: feedback.shar: unknown key 'shar'; did you mean 'share'?"
    ]
    errors = scenario_errors(tmp_path, BASE + "feedback: {share: 0}\n")
    assert len(errors) == 1 and ": feedback.share: " in errors[0] and "greater than 0" in errors[0]
    errors = scenario_errors(tmp_path, BASE + "feedback: {share: 1.5}\n")
    assert len(errors) == 1 and ": feedback.share: " in errors[0]


def test_feedback_over_grpc_is_a_validation_error(tmp_path: Path) -> None:
    text = """\
target: {grpc: "127.0.0.1:8001"}
protocol: grpc
load: {shape: poisson, rps: 10, duration_s: 5}
feedback: {share: 1}
"""
    (error,) = scenario_errors(tmp_path, text)
    assert error.startswith(f"{tmp_path / 's.yaml'}:4:")
    assert ": feedback: feedback is not supported with protocol grpc" in error


def test_feedback_needs_the_infer_endpoint() -> None:
    doc = {
        "target": {"url": "http://127.0.0.1:8000"},
        "request": {"endpoint": "live"},
        "load": {"shape": "constant", "rps": 10, "duration_s": 1},
        "feedback": {},
    }
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc)
    assert info.value.errors == [
        "<scenario>: feedback: feedback needs request.endpoint: infer (labels of answered samples)"
    ]


def test_a_harness_started_gateway_shares_its_token_with_the_generators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ENSEMBLE_FEEDBACK_TOKEN", raising=False)
    monkeypatch.delenv("MY_TOKEN", raising=False)
    sc = parse_scenario(
        {
            "target": {"url": "http://127.0.0.1:8000"},
            "load": {"shape": "constant", "rps": 10, "duration_s": 1},
            "feedback": {"token_env": "MY_TOKEN"},
        }
    )
    provide_feedback_token(sc)  # none given: one made for the run
    made = os.environ["MY_TOKEN"]
    assert len(made) == 32 and os.environ["ENSEMBLE_FEEDBACK_TOKEN"] == made
    monkeypatch.setenv("MY_TOKEN", "given")
    provide_feedback_token(sc)
    assert os.environ["ENSEMBLE_FEEDBACK_TOKEN"] == "given"


def test_grpc_client_refuses_feedback_rather_than_ignoring_it() -> None:
    with pytest.raises(ValueError, match="HTTP only"):
        GrpcClient("127.0.0.1:8001", shape(), WORK)


# --- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [HttpJsonClient, HttpBinaryClient])
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_requests_are_sent_as_encoded_with_no_id(cls: type[HttpJsonClient], share: float) -> None:
    client = cls("http://127.0.0.1:8000", shape(share=share), WORK, connections=1)
    assert (client.sender is None) == (share == 0.0)
    for klass in (0, 1):
        for batch in range(WORK.batches):
            _, headers, body = split_http(client.payloads[klass][batch])
            request = decode_infer_request(
                body, headers.get("inference-header-content-length"), "digits", None
            )
            assert request.id is None  # answers are joined by the feedback_id they carry
            assert request.parameters == CLASSES[klass]
            np.testing.assert_array_equal(request.inputs[0].data, WORK.rows(batch))


# --- posting labels --------------------------------------------------------------------------


class FakePool:
    """Records what is sent; answers later, when the test says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def send(self, payload: bytes, done: Any) -> None:
        self.sent.append((payload, done))

    def answer_all(self, status: int = 200, err: str | None = None) -> None:
        sent, self.sent = self.sent, []
        for _, done in sent:
            done(status, None, b"{}", err)

    async def close(self) -> None:
        pass


def wired(share: float = 1.0, seed: int = 0) -> tuple[HttpBinaryClient, FakePool, FakePool]:
    client = HttpBinaryClient("http://127.0.0.1:8000", shape(share, seed), WORK, connections=1)
    infer, posts = FakePool(), FakePool()
    client.pool = infer  # type: ignore[assignment]
    assert client.sender is not None
    client.sender.pool = posts  # type: ignore[assignment]
    return client, infer, posts


def binary_answer(labels: list[int], feedback_id: str | None = None) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [len(labels)],
                 "parameters": {"binary_data_size": 8 * len(labels)}}
            ],
            "parameters": {"feedback_id": feedback_id} if feedback_id else {},
        }
    )  # fmt: skip
    return header + np.asarray(labels, dtype="<i8").tobytes(), len(header)


def test_true_labels_are_posted_after_successful_answers_only() -> None:
    client, infer, posts = wired()
    got: list[tuple[str | None, Any]] = []
    for batch in range(3):
        client.submit(1, batch, lambda err, labels, *_: got.append((err, labels)))
    answers = [binary_answer([7, 7], "fid-0"), binary_answer([1, 4], "fid-1")]
    (_, first), (_, second), (_, third) = infer.sent
    first(200, answers[0][1], answers[0][0], None)  # answered (wrongly): labels still go back
    second(503, None, b'{"error": "draining"}', None)  # failed: nothing to label
    third(0, None, b"", "timeout")
    assert got == [(None, [7, 7]), ("http_503", None), ("timeout", None)]
    assert len(posts.sent) == 1
    first_line, headers, body = split_http(posts.sent[0][0])
    assert first_line == "POST /v2/models/digits/feedback HTTP/1.1"
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert parse_body(body) == ("fid-0", [3, 1])  # the true labels of batch 0
    assert client.feedback == {"sent": 1}
    posts.answer_all(200)
    assert client.feedback == {"sent": 1, "accepted": 1}


def test_a_share_of_answers_gets_feedback_repeatably() -> None:
    def posted(seed: int) -> list[str]:
        client, infer, posts = wired(share=0.3, seed=seed)
        for n in range(400):
            client.submit(0, n % 3, lambda *_: None)
        for n, (_, done) in enumerate(infer.sent):
            body, hlen = binary_answer([0, 0], f"fid-{n}")
            done(200, hlen, body, None)
        return [parse_body(split_http(raw)[2])[0] for raw, _ in posts.sent]

    first = posted(seed=1)
    assert 80 <= len(first) <= 160
    assert first == posted(seed=1)
    assert first != posted(seed=2)


def test_answers_without_a_feedback_id_are_counted_not_posted() -> None:
    client, infer, posts = wired()
    client.submit(0, 0, lambda *_: None)
    body, hlen = binary_answer([3, 1])  # a gateway without its feedback token issues no id
    infer.sent[0][1](200, hlen, body, None)
    assert posts.sent == []
    assert client.feedback == {"no_feedback_id": 1}


def test_close_waits_for_posts_in_flight_then_counts_the_rest() -> None:
    asyncio.run(_close_waits())


async def _close_waits() -> None:
    sender = FeedbackSender("h:1", "digits", 1.0, 0, [[1], [2]])
    posts = FakePool()
    sender.pool = posts  # type: ignore[assignment]
    sender.answered("a", 0)
    sender.answered("b", 1)
    asyncio.get_running_loop().call_later(0.01, posts.answer_all, 404)
    await sender.close(timeout_s=5)
    assert sender.counts == {"sent": 2, "http_404": 2}

    sender = FeedbackSender("h:1", "digits", 1.0, 0, [[1]])
    sender.pool = FakePool()  # type: ignore[assignment]
    sender.answered("c", 0)
    await sender.close(timeout_s=0.01)  # the post never answers
    assert sender.counts == {"sent": 1, "unfinished": 1}


# --- results and report ----------------------------------------------------------------------


def scenario_with_feedback() -> Any:
    return parse_scenario(
        {
            "target": {"url": "http://127.0.0.1:1"},
            "load": {"shape": "constant", "rps": 10, "duration_s": 1},
            "feedback": {"share": 0.5},
        }
    )


def one_record() -> Records:
    rec = Records()
    rec.add(0.0, 0.0, 0.001, 0, 0, 1)
    return rec


def test_report_counts_feedback_and_warns_about_failed_posts() -> None:
    info = RunInfo(
        "t", "t.yaml", "2026-01-01T00:00:00", "http://127.0.0.1:1", None, False, None, []
    )
    counts = {"sent": 10, "accepted": 7, "http_404": 2, "timeout": 1}
    result = GeneratorResult(one_record(), {}, 0, 0.0, 1.0, counts)
    report = build_report(scenario_with_feedback(), result, info)
    assert report["feedback"] == {
        "share": 0.5,
        "sent": 10,
        "accepted": 7,
        "errors": {"http_404": 2, "timeout": 1},
    }
    assert "feedback posts that were not accepted: 2 x http_404, 1 x timeout" in report["warnings"]
    assert "| feedback posts sent / accepted / failed (share 0.5) | 10 / 7 / 3 |" in (
        render_markdown(report)
    )
    plain = parse_scenario(
        {"target": {"url": "http://127.0.0.1:1"}, "load": {"shape": "constant", "rps": 1,
                                                          "duration_s": 1}}
    )  # fmt: skip
    report = build_report(plain, GeneratorResult(one_record(), {}, 0, 0.0, 1.0), info)
    assert report["feedback"] is None and "feedback" not in render_markdown(report)


def test_generator_processes_feedback_counts_are_summed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    job = Job(scenario_with_feedback(), "http://127.0.0.1:1", None, tmp_path / "x.npz", None)
    fleet = ProcessFleet(job, 2)
    parts = [
        GeneratorResult(one_record(), {}, 0, 0.1, 1.0, {"sent": 3, "accepted": 3}),
        GeneratorResult(one_record(), {}, 0, 0.1, 1.0, {"sent": 2, "accepted": 1, "http_404": 1}),
    ]

    async def collect(index: int) -> GeneratorResult:
        return parts[index]

    monkeypatch.setattr(fleet, "_collect", collect)
    merged = asyncio.run(fleet.run(0.0))
    assert merged.feedback == {"sent": 5, "accepted": 4, "http_404": 1}
    assert len(merged.records) == 2


# --- end to end against a fake gateway -------------------------------------------------------


class FakeGateway:
    """Answers infer with the true labels of the rows sent and a feedback id; joins feedback
    posted with its token by that id."""

    def __init__(self) -> None:
        self.answered: dict[str, list[int]] = {}
        self.feedback: dict[str, list[int]] = {}
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                first, *lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines if ":" in x)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                status, answer = self.handle(first.split()[1], headers, body)
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if path.endswith("/ready"):
            return 200, b""
        if path.endswith("/infer"):
            request = decode_infer_request(
                body, headers.get("inference-header-content-length"), "digits", None
            )
            rows = request.inputs[0].data
            labels = [int(Y[np.flatnonzero((row == X).all(axis=1))[0]]) for row in rows]
            feedback_id = f"fid-{len(self.answered)}"
            self.answered[feedback_id] = labels
            doc = {"outputs": [{"name": "label", "datatype": "INT64", "shape": [len(labels)],
                                "data": labels}],
                   "parameters": {"feedback_id": feedback_id}}  # fmt: skip
            return 200, orjson.dumps(doc)
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, b'{"error": "send the feedback token"}'
        feedback_id, labels = parse_body(body)
        if feedback_id not in self.answered:
            return 404, b'{"error": "unknown id"}'
        self.feedback[feedback_id] = labels
        return 200, b'{"accepted": true}'


def test_local_fleet_posts_labels_by_feedback_id_with_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.savez(tmp_path / "data.npz", X=X, y=Y)
    monkeypatch.setenv("ENSEMBLE_FEEDBACK_TOKEN", TOKEN)
    asyncio.run(_local_fleet(tmp_path))


async def _local_fleet(tmp_path: Path) -> None:
    gateway = FakeGateway()
    url = await gateway.start()
    sc = parse_scenario(
        {
            "target": {"url": url},
            "load": {"shape": "constant", "rps": 200, "duration_s": 0.2},
            "request": {"batch_size": 2},
            "feedback": {},
        }
    )
    fleet = LocalFleet(Job(sc, url, None, tmp_path / "data.npz", None))
    await fleet.start()
    result = await fleet.run(time.monotonic())
    assert gateway.server is not None
    gateway.server.close()
    await gateway.server.wait_closed()
    assert len(result.records) == 40
    assert result.feedback == {"sent": 40, "accepted": 40}
    assert gateway.feedback == gateway.answered  # every answer labelled, with its true labels
