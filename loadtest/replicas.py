"""Replica server processes a load-test tool starts itself, and a delay proxy in front of one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loadtest.fleet import TargetError
from loadtest.gateway import Gateway, close_stdout, start_server, stop_gateway

HOST = "127.0.0.1"
_CHUNK = 64 * 1024


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every byte on its way to the upstream for
    ``delay_ms`` (0 by default): a slow replica, as the gateway sees it, with the replica
    process itself untouched. Answers come back undelayed. Bytes are released in order at
    their arrival time plus the delay, so a request split over several reads is delayed once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def set_delay_ms(self, delay_ms: float) -> None:
        self.delay_s = max(0.0, delay_ms) / 1000

    async def start(self) -> int:
        """Listen on a free port; returns it."""
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.close()  # the replica is down: the client sees its connection closed
            return
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        pipes = [
            asyncio.ensure_future(self._read_into(reader, queue)),
            asyncio.ensure_future(self._release(queue, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        try:
            # Either side closing (or failing) ends the connection for both.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()

    async def _read_into(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        while data := await reader.read(_CHUNK):
            queue.put_nowait((time.monotonic() + self.delay_s, data))

    @staticmethod
    async def _release(
        queue: asyncio.Queue[tuple[float, bytes]], out: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            out.write(data)
            await out.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        while data := await reader.read(_CHUNK):
            out.write(data)
            await out.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class ReplicaProcess:
    """An `ensemble replica MODEL` process this tool started (the only kind its faults touch),
    optionally behind a `DelayProxy`; it can be killed and started again on the same ports."""

    def __init__(
        self, name: str, model: Path, log_dir: Path, *, startup_timeout_s: float = 120.0
    ) -> None:
        self.name = name
        self.model = model
        self.log_dir = log_dir
        self.startup_timeout_s = startup_timeout_s
        self.server: Gateway | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.proxy: DelayProxy | None = None
        self.starts = 0
        self.kills = 0

    async def start(self, *, proxied: bool = False) -> None:
        """Start on free ports (later restarts reuse them); with ``proxied``, put a
        DelayProxy in front of its HTTP port."""
        await self._launch()
        if proxied:
            self.proxy = DelayProxy(self.http_port)
            await self.proxy.start()

    async def _launch(self) -> None:
        log = self.log_dir / f"replica-{self.name}{f'-{self.starts}' if self.starts else ''}.log"
        args = ["replica", str(self.model)]
        args += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        launch = asyncio.ensure_future(
            asyncio.to_thread(start_server, args, log, self.startup_timeout_s)
        )
        try:
            try:
                server = await asyncio.shield(launch)
            except asyncio.CancelledError:
                # The thread goes on starting the process whatever happens here: wait for it
                # (bounded by the startup timeout) so the process is this object's to stop,
                # never a running child nobody holds.
                server = await launch
                self._adopt(server)
                raise
        except TargetError as exc:
            raise RuntimeError(f"replica {self.name}: {exc}") from None
        self._adopt(server)

    def _adopt(self, server: Gateway) -> None:
        self.starts += 1
        self.server = server
        self.http_port = int(server.url.rpartition(":")[2])
        self.grpc_port = int(server.grpc.rpartition(":")[2])

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.server is None else self.server.proc.pid

    @property
    def http_url(self) -> str:
        """Where the gateway should send OIP REST calls: the proxy when there is one."""
        return self.proxy.url if self.proxy is not None else f"http://{HOST}:{self.http_port}"

    @property
    def direct_url(self) -> str:
        """The process's own OIP REST address (never through the proxy)."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def kill(self) -> int:
        """SIGKILL: the process dies at once, as in a crash (no drain, connections reset)."""
        server = self.server
        if server is None or not self.running:
            raise RuntimeError(f"replica {self.name} is not running")
        server.proc.kill()
        server.proc.wait()
        close_stdout(server)
        self.kills += 1
        return server.proc.pid

    async def restart(self) -> None:
        """Start it again on its ports (the proxy, if any, stays where it was)."""
        if self.running:
            raise RuntimeError(f"replica {self.name} is still running")
        await self._launch()

    def set_delay_ms(self, delay_ms: float) -> None:
        if self.proxy is None:
            raise ValueError(f"replica {self.name} has no delay proxy in front of it")
        self.proxy.set_delay_ms(delay_ms)

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None when it was not running)."""
        code: int | None = None
        server, self.server = self.server, None
        if server is not None:
            running = server.proc.poll() is None
            code = await asyncio.to_thread(stop_gateway, server, timeout_s)
            code = code if running else None
        if self.proxy is not None:
            await self.proxy.close()
        return code
