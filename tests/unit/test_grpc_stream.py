"""ModelStreamInfer's handler without sockets: a stream holds at most its cap of requests read
and not yet answered (a client that does not read its answers stops the reading), and each
failure becomes that request's error response, named by its id."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from tritonclient.grpc import service_pb2

from ensemble.errors import InvalidInput, Overloaded
from ensemble.frontends.grpc_stream import StreamInfer


class Servicer:
    """What the handler needs of the gRPC servicer: each request waits for ``gate``; some fail."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gate = asyncio.Event()
        self.metrics = SimpleNamespace(rejections=Counter())
        self.metrics.record_rejection = lambda protocol, reason: self.metrics.rejections.update(
            [(protocol, reason)]
        )

    async def parse_infer(self, raw: bytes) -> Any:
        if raw == b"garbage":
            raise InvalidInput("malformed ModelInferRequest message")
        return SimpleNamespace(id=raw.decode())

    async def infer(self, request: Any, context: Any, method: str) -> Any:
        assert method == "ModelStreamInfer"
        self.started.append(request.id)
        await self.gate.wait()
        if request.id == "shed":
            raise Overloaded("too many requests", retry_after_s=2)
        if request.id == "bug":
            raise RuntimeError("a bug")
        if len(request.id) > 1024:  # as decoding refuses it
            raise InvalidInput(f"'id' has {len(request.id):,} characters; at most 1024")
        return service_pb2.ModelInferResponse(id=request.id)


async def sent(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def settle() -> None:
    for _ in range(50):  # let every task run as far as it can (no time passes)
        await asyncio.sleep(0)


def test_a_client_that_does_not_read_its_answers_holds_the_cap_and_no_more() -> None:
    async def main() -> tuple[list[int], list[str]]:
        servicer = Servicer()
        answers = StreamInfer(servicer, None, max_in_flight=3).answers(
            sent(*(str(i).encode() for i in range(10))), None
        )
        seen = []
        first = asyncio.ensure_future(anext(answers))
        await settle()
        seen.append(len(servicer.started))  # 3 read, none answered
        servicer.gate.set()
        ids = [(await first).infer_response.id]
        await settle()
        seen.append(len(servicer.started))  # one answered, not yet written: still 3
        ids.append((await anext(answers)).infer_response.id)  # the first written: one more
        await settle()
        seen.append(len(servicer.started))
        ids += [a.infer_response.id async for a in answers]
        return seen, ids

    seen, ids = asyncio.run(main())
    assert seen == [3, 3, 4]
    assert sorted(ids, key=int) == [str(i) for i in range(10)]


def test_each_failure_is_its_own_requests_error_and_the_stream_goes_on() -> None:
    async def main() -> tuple[dict[str, str], Servicer]:
        servicer = Servicer()
        servicer.gate.set()
        handler = StreamInfer(servicer, None, max_in_flight=8)
        stream = handler.answers(sent(b"ok-1", b"garbage", b"shed", b"bug", b"ok-2"), None)
        out = {}
        async for answer in stream:
            out[answer.infer_response.id or "?"] = answer.error_message
        return out, servicer

    out, servicer = asyncio.run(main())
    assert out["ok-1"] == out["ok-2"] == ""
    assert out["?"] == "INVALID_ARGUMENT: malformed ModelInferRequest message"
    assert out["shed"] == "request 'shed': RESOURCE_EXHAUSTED: too many requests (retry after 2 s)"
    assert out["bug"] == "request 'bug': INTERNAL: internal error; see the gateway log"
    assert servicer.metrics.rejections == Counter(
        {("grpc", "invalid_input"): 1, ("grpc", "shed"): 1}
    )


def test_an_id_over_the_limit_is_refused_and_not_echoed() -> None:
    async def main() -> list[Any]:
        servicer = Servicer()
        servicer.gate.set()
        stream = StreamInfer(servicer, None, max_in_flight=8).answers(sent(b"y" * 100_000), None)
        return [answer async for answer in stream]

    (answer,) = asyncio.run(main())
    assert answer.infer_response.id == ""
    assert answer.error_message == "INVALID_ARGUMENT: 'id' has 100,000 characters; at most 1024"


class ExecuteBatchError(Exception):
    """Named as the error grpc.aio raises when gRPC core fails a write."""


class GoneContext:
    """A call whose client went away: writes fail, and the call says it was cancelled."""

    def __init__(self) -> None:
        self.writes = 0

    async def write(self, message: Any) -> None:
        self.writes += 1
        raise ExecuteBatchError("execute_batch failed")

    def done(self) -> bool:
        return False  # not yet: gRPC core may fail the write before the call shows it


def test_a_client_gone_mid_stream_ends_it_quietly_with_nothing_left_running() -> None:
    async def main() -> tuple[int, int]:
        servicer = Servicer()
        servicer.gate.set()
        context = GoneContext()
        before = len(asyncio.all_tasks())
        requests = sent(*(str(i).encode() for i in range(20)))
        await StreamInfer(servicer, None, max_in_flight=4).handle(requests, context)
        await settle()
        return context.writes, len(asyncio.all_tasks()) - before

    writes, left = asyncio.run(main())
    assert writes == 1 and left == 0


def test_a_draining_gateway_answers_what_a_stream_read_and_ends_it() -> None:
    async def main() -> tuple[list[str], list[str], list[Any]]:
        servicer = Servicer()
        handler = StreamInfer(servicer, None, max_in_flight=2)

        async def endless() -> AsyncIterator[bytes]:
            for i in range(1000):
                yield str(i).encode()

        answers = handler.answers(endless(), None)
        first = asyncio.ensure_future(anext(answers))
        await settle()
        read = list(servicer.started)  # the cap's worth read, waiting to be answered
        handler.drain()
        servicer.gate.set()
        got = [(await first).infer_response.id]
        got += [a.infer_response.id async for a in answers]  # then the stream ends
        late = [a async for a in handler.answers(sent(b"x"), None)]  # opened while draining
        return read, got, late

    read, got, late = asyncio.run(main())
    assert read == ["0", "1"]
    assert sorted(got) == ["0", "1"]
    assert late == []


def test_a_drain_after_the_client_closed_its_side_still_answers_what_was_read() -> None:
    async def main() -> list[str]:
        servicer = Servicer()
        handler = StreamInfer(servicer, None, max_in_flight=4)
        answers = handler.answers(sent(b"a", b"b"), None)  # the client sends two, then closes
        first = asyncio.ensure_future(anext(answers))
        await settle()
        handler.drain()  # both are being answered: the drain must not cut them off
        await settle()
        servicer.gate.set()
        return [(await first).infer_response.id] + [a.infer_response.id async for a in answers]

    assert sorted(asyncio.run(main())) == ["a", "b"]
