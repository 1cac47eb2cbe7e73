"""Writes within one event-loop iteration leave in one socket write (`CoalescedWrites`)."""

from __future__ import annotations

import asyncio

from ensemble.frontends.connections import CoalescedWrites


class _Recording:
    """A transport that records each call that reaches the socket."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.closed = False

    def writelines(self, chunks: list[bytes]) -> None:
        self.writes.append(list(chunks))

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.writes.append([b"<eof>"])

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_writes_within_one_loop_iteration_leave_as_one() -> None:
    async def scenario() -> None:
        raw = _Recording()
        coalesced = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalesced.write(b"headers")
        coalesced.write(b"")
        coalesced.write(b"message")
        coalesced.write(b"trailers")
        assert raw.writes == []
        await asyncio.sleep(0)  # the iteration ends
        assert raw.writes == [[b"headers", b"message", b"trailers"]]  # one writev, no copy
        coalesced.write(b"goaway")
        coalesced.close()  # what is pending leaves first
        assert raw.writes[-1] == [b"goaway"] and raw.closed
        assert coalesced.is_closing()
        assert coalesced.get_extra_info("peername") == "extra peername"  # the rest passes

    asyncio.run(scenario())


def test_writes_pending_when_the_connection_is_lost_are_dropped() -> None:
    async def scenario() -> None:
        raw = _Recording()
        coalesced = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalesced.write(b"head")
        raw.close()  # the transport closed itself (the peer reset it) in the same iteration
        await asyncio.sleep(0)
        assert raw.writes == []  # not written into a closed transport (uvloop would raise)

    asyncio.run(scenario())


def test_nothing_is_written_after_the_end_of_the_stream() -> None:
    async def scenario() -> None:
        raw = _Recording()
        coalesced = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalesced.write(b"goaway")
        coalesced.write_eof()  # a lingering close: the pending write leaves first
        coalesced.write(b"late")  # a transport would raise: writing after write_eof
        await asyncio.sleep(0)
        assert raw.writes == [[b"goaway"], [b"<eof>"]]

    asyncio.run(scenario())
