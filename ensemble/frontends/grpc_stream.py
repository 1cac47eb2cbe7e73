"""ModelStreamInfer on the grpc.aio stack: a stream of inference requests answered as each one
is done (tritonclient's ``start_stream`` / ``async_stream_infer``).

Every request on the stream is one ModelInfer call (limits, admission, its own contract and
deadline, metrics); its answer carries the request's ``id``, so answers may overtake each
other, as they do on Triton. A request that fails gets a response with ``error_message`` and
the stream goes on (a message over ``max_request_bytes`` is refused by gRPC core itself, which
ends the stream). At most ``max_in_flight`` requests of one stream are read and not yet
answered: past that the gateway stops reading the stream, so a client that sends faster than
it reads its answers holds that many, not more. When the gateway stops, every stream answers
what it read and ends (``drain``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Final

from tritonclient.grpc import service_pb2

from ensemble.auth import ApiKeys
from ensemble.errors import EnsembleError, Overloaded
from ensemble.oip.checks import MAX_ID_CHARS

logger = logging.getLogger(__name__)

_END: Final = object()


class StreamInfer:
    """The ModelStreamInfer handler over a servicer's ``parse_infer`` and ``infer``."""

    def __init__(self, servicer: Any, keys: ApiKeys | None, max_in_flight: int) -> None:
        self.servicer = servicer
        self.keys = keys
        self.max_in_flight = max_in_flight
        self.draining = False
        self._pumps: set[asyncio.Task[None]] = set()
        """Each open stream's reader."""

    async def handle(self, requests: AsyncIterator[bytes], context: Any) -> None:
        """One stream, each answer written as it is done. A client that went away ends it
        quietly (a write to a cancelled call fails; that is no error of the gateway's)."""
        answers = self.answers(requests, context)
        try:
            async for answer in answers:
                try:
                    await context.write(answer)
                except Exception as exc:
                    # gRPC core failed the send: the call is gone (the client cancelled or
                    # its connection broke, which the call may not show yet).
                    if type(exc).__name__ == "ExecuteBatchError" or context.done():
                        return
                    raise
        finally:
            await answers.aclose()

    async def answers(self, requests: AsyncIterator[bytes], context: Any) -> AsyncGenerator[Any]:
        """The stream's answers as they are done; each taken from here frees the place of one
        more request."""
        if self.keys is not None:
            await self.servicer.authorize(context, self.keys)
        slots = asyncio.Semaphore(self.max_in_flight)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        pump = asyncio.create_task(self._pump(requests, context, slots, answers, running))
        self._pumps.add(pump)
        try:
            while (answer := await answers.get()) is not _END:
                yield answer
                slots.release()  # answered and written: the stream may carry one more
            await pump  # the stream's own failure, if reading it failed
        finally:
            self._pumps.discard(pump)
            pump.cancel()
            for task in running:
                task.cancel()
            await asyncio.gather(pump, *running, return_exceptions=True)

    def drain(self) -> None:
        """The gateway is stopping: every stream reads no more requests, answers those it
        read, and ends (OK), as a stream that its client closed does; new streams end at
        once. Without it an open stream would hold the stop for all of its grace period."""
        self.draining = True
        for pump in self._pumps:
            pump.cancel()

    async def _pump(
        self,
        requests: AsyncIterator[bytes],
        context: Any,
        slots: asyncio.Semaphore,
        answers: asyncio.Queue[Any],
        running: set[asyncio.Task[None]],
    ) -> None:
        """Read the stream's requests and start each, until it ends or the gateway drains;
        then the answer of every request read, then the end."""
        try:
            try:
                if not self.draining:
                    async for raw in requests:
                        await slots.acquire()
                        task = asyncio.create_task(self._answer(raw, context, answers))
                        running.add(task)
                        task.add_done_callback(running.discard)
            except asyncio.CancelledError:
                if not self.draining:
                    raise
            while running:  # a drain that comes now changes nothing: these are answered
                try:
                    await asyncio.wait(set(running))
                except asyncio.CancelledError:
                    if not self.draining:
                        raise
        finally:
            answers.put_nowait(_END)

    async def _answer(self, raw: bytes, context: Any, answers: asyncio.Queue[Any]) -> None:
        request_id = ""
        try:
            request = await self.servicer.parse_infer(raw)
            if len(request.id) <= MAX_ID_CHARS:  # a longer one is refused, not echoed
                request_id = request.id
            response = await self.servicer.infer(request, context, "ModelStreamInfer")
        except EnsembleError as exc:
            self.servicer.metrics.record_rejection("grpc", exc.reason)
            message = f"{exc.grpc_code}: {exc.message}"
            if isinstance(exc, Overloaded):
                message += f" (retry after {exc.retry_after_s:g} s)"
            answers.put_nowait(_failed(request_id, message))
        except Exception:
            logger.exception("gRPC ModelStreamInfer request %r failed", request_id)
            answers.put_nowait(_failed(request_id, "INTERNAL: internal error; see the gateway log"))
        else:
            answers.put_nowait(service_pb2.ModelStreamInferResponse(infer_response=response))


def _failed(request_id: str, message: str) -> Any:
    """The answer to a request that failed: its error (naming the request when it has an id)
    and its id."""
    if request_id:
        message = f"request '{request_id}': {message}"
    return service_pb2.ModelStreamInferResponse(
        error_message=message, infer_response=service_pb2.ModelInferResponse(id=request_id)
    )
