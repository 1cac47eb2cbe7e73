"""ModelStreamInfer through a real gateway with tritonclient's stream API (`start_stream`,
`async_stream_infer`): every request answered with its id and the same outputs as a unary call;
a bad request fails alone and the stream goes on; an API key guards the stream; the uvicorn
gRPC stack, which serves unary calls only, answers UNIMPLEMENTED."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.helpers import labelled, scrape, wait_for
from tests.integration.process import GatewayProcess, start_from_config, zoo_member

pytestmark = pytest.mark.integration
KEY = "stream-test-key"
ROWS = np.random.default_rng(13).uniform(0, 16, (12, 64)).astype(np.float32)
CONFIG = {
    "ensembles": [{"name": "digits", "members": [zoo_member("logreg"), zoo_member("mlp_small")]}]
}

Answer = tuple[Any, InferenceServerException | None]


@pytest.fixture(scope="module")
def gw(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_from_config(CONFIG, tmp_path_factory.mktemp("stream"))
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def grpc_successes(gw: GatewayProcess) -> float:
    text = scrape(gw.http_url)
    return (
        labelled(
            text, "ensemble_requests_total", model="digits", protocol="grpc", outcome="success"
        )
        or 0.0
    )


def row(i: int, shape: tuple[int, ...] = (1, 64)) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(shape), "FP32")
    data = ROWS[i : i + 1] if shape == (1, 64) else np.zeros(shape, np.float32)
    inp.set_data_from_numpy(data)
    return inp


def stream(
    gw: GatewayProcess, sends: list[tuple[str, str, grpcclient.InferInput]], **start: Any
) -> list[Answer]:
    """Send ``(model, request id, input)`` on one stream; every answer, as they came (one
    error when the server ends the stream)."""
    answers: queue.Queue[Answer] = queue.Queue()
    client = grpcclient.InferenceServerClient(gw.grpc_target)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), **start)
        expected = 0
        for model, request_id, inp in sends:
            try:
                client.async_stream_infer(model, [inp], request_id=request_id)
            except InferenceServerException:  # the stream was ended: its error is an answer
                expected = max(expected, 1)
                break
            expected += 1
        got = [answers.get(timeout=30) for _ in range(expected)]
        client.stop_stream()
    finally:
        client.close()
    return got


def test_every_request_is_answered_with_its_id_as_a_unary_call_would(gw: GatewayProcess) -> None:
    sends = [("digits" if i % 2 else "logreg", f"r{i}", row(i)) for i in range(len(ROWS))]
    before = grpc_successes(gw)
    answers = stream(gw, sends)
    assert grpc_successes(gw) - before == len(ROWS) // 2  # each counted as a gRPC request
    assert all(error is None for _, error in answers), [e for _, e in answers if e]
    by_id = {result.get_response().id: result for result, _ in answers}
    assert sorted(by_id) == sorted(f"r{i}" for i in range(len(ROWS)))
    unary = grpcclient.InferenceServerClient(gw.grpc_target)
    try:
        for model, request_id, inp in sends:
            expected = unary.infer(model, [inp]).as_numpy("probabilities")
            got = by_id[request_id].as_numpy("probabilities")
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=request_id)
    finally:
        unary.close()


def test_a_bad_request_fails_alone_and_the_stream_goes_on(gw: GatewayProcess) -> None:
    sends = [
        ("digits", "good-1", row(0)),
        ("digits", "wrong-shape", row(0, (1, 3))),
        ("no_such_model", "unknown", row(0)),
        ("digits", "good-2", row(1)),
    ]
    answers = stream(gw, sends)
    good = sorted(result.get_response().id for result, error in answers if error is None)
    errors = sorted(str(error) for _, error in answers if error is not None)
    assert good == ["good-1", "good-2"]
    assert len(errors) == 2
    assert "request 'unknown': NOT_FOUND" in errors[0]
    assert "request 'wrong-shape': INVALID_ARGUMENT" in errors[1]


def test_a_client_that_cancels_a_stalled_stream_leaves_nothing_behind(gw: GatewayProcess) -> None:
    """Many large answers unread (the gateway's writes block on flow control), then the call
    cancelled: the gateway goes idle again, and logs no error for a client that went away
    (the module's gateway is checked for tracebacks when it stops)."""
    failed = labelled(scrape(gw.http_url), "ensemble_requests_total", outcome="server_error")
    inputs = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1000, 64]
    )
    message = service_pb2.ModelInferRequest(
        model_name="digits", inputs=[inputs], raw_input_contents=[bytes(1000 * 64 * 4)]
    ).SerializeToString()
    with grpc.insecure_channel(gw.grpc_target) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )(iter([message] * 2000), timeout=60)
        seen: list[float] = []

        def stalled() -> bool:  # answered requests stop growing: the writes are blocked
            seen.append(grpc_successes(gw))
            return len(seen) > 3 and seen[-1] == seen[-3] > seen[0]

        wait_for(stalled, "the stream to stall on unread answers", timeout_s=30, interval_s=0.2)
        call.cancel()
    wait_for(
        lambda: labelled(scrape(gw.http_url), "ensemble_inflight_requests") == 0,
        "the gateway idle again",
        timeout_s=30,
    )
    # Requests the cancel cut short are the client's doing, not server errors.
    assert (
        labelled(scrape(gw.http_url), "ensemble_requests_total", outcome="server_error") == failed
    )


def test_a_call_its_client_cancels_is_counted_as_cancelled(zoo_dir: Path, tmp_path: Path) -> None:
    """A member behind a 2 s link: a unary call and a stream request in flight when their
    client cancels are `cancelled`, not server errors (they burn no availability budget)."""
    slow = {
        "tiers": {"cloud": {"link": {"emulate": True, "delay_ms": 2000}}},
        "ensembles": [{"name": "far", "members": [zoo_member("logreg", {"tier": "cloud"})]}],
    }
    gw = start_from_config(slow, tmp_path)
    try:
        client = grpcclient.InferenceServerClient(gw.grpc_target)
        unary = client.async_infer("far", [row(0)], callback=lambda result, error: None)
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer("far", [row(1)], request_id="s")

        def running() -> bool:
            return labelled(scrape(gw.http_url), "ensemble_inflight_requests") == 2

        wait_for(running, "both requests in flight", timeout_s=10)
        unary.cancel()
        client.stop_stream(cancel_requests=True)
        client.close()

        def counted() -> bool:
            text = scrape(gw.http_url)
            return labelled(text, "ensemble_requests_total", model="far", outcome="cancelled") == 2

        wait_for(counted, "both counted as cancelled", timeout_s=10)
        text = scrape(gw.http_url)
        assert labelled(text, "ensemble_requests_total", outcome="server_error") is None
    finally:
        assert gw.stop() == 0, gw.log()


def test_a_stopping_gateway_answers_streams_in_flight_and_ends_them(
    zoo_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM with two streams open: one idle, one with a request behind a 1 s link. The
    request is answered, both streams end, and the gateway exits 0 well within its drain time
    (30 s), as Triton does once no request is in flight."""
    slow = {
        "tiers": {"cloud": {"link": {"emulate": True, "delay_ms": 1000}}},
        "ensembles": [{"name": "far", "members": [zoo_member("logreg", {"tier": "cloud"})]}],
    }
    gw = start_from_config(slow, tmp_path)
    got: queue.Queue[Answer] = queue.Queue()
    idle = grpcclient.InferenceServerClient(gw.grpc_target)
    busy = grpcclient.InferenceServerClient(gw.grpc_target)
    try:
        idle.start_stream(callback=lambda result, error: None)
        busy.start_stream(callback=lambda result, error: got.put((result, error)))
        busy.async_stream_infer("far", [row(0)], request_id="in-flight")
        wait_for(
            lambda: labelled(scrape(gw.http_url), "ensemble_inflight_requests") == 1,
            "the request in flight",
            timeout_s=10,
        )
        started = time.monotonic()
        assert gw.stop() == 0, gw.log()
        assert time.monotonic() - started < 10
        result, error = got.get(timeout=10)
        assert error is None and result.get_response().id == "in-flight"
    finally:
        for client in (idle, busy):
            client.stop_stream()
            client.close()
    assert "Traceback" not in gw.log(), gw.log()


def test_an_api_key_guards_the_stream(zoo_dir: Path, tmp_path: Path) -> None:
    gw = start_from_config(CONFIG, tmp_path, env={"ENSEMBLE_API_KEYS": KEY})
    try:
        ((result, error),) = stream(gw, [("digits", "no-key", row(0))])
        assert result is None and error is not None and "UNAUTHENTICATED" in str(error.status())
        ((result, error),) = stream(
            gw, [("digits", "keyed", row(0))], headers={"authorization": f"Bearer {KEY}"}
        )
        assert error is None and result.get_response().id == "keyed"
    finally:
        assert gw.stop() == 0, gw.log()


def test_the_uvicorn_grpc_stack_answers_unimplemented(zoo_dir: Path, tmp_path: Path) -> None:
    gw = start_from_config({**CONFIG, "server": {"grpc_stack": "uvicorn"}}, tmp_path)
    try:
        ((result, error),) = stream(gw, [("digits", "r", row(0))])
        assert result is None and error is not None and "UNIMPLEMENTED" in str(error.status())
    finally:
        assert gw.stop() == 0, gw.log()
