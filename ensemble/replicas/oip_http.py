"""The oip-http backend: a replica on an OIP REST server, binary tensors over keep-alive HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from ensemble import tracing
from ensemble.errors import EnsembleError, InvalidInput, MemberFailed
from ensemble.oip.rest import (
    HEADER_LENGTH,
    decode_response_body,
    encode_request_body,
    error_message,
)
from ensemble.replicas.remote import Outputs, RemoteReplica, describe
from ensemble.scope import outgoing

LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=4.0)
"""Per replica: up to 64 calls in flight, each on a connection of its own (HTTP/1.1), kept
open between calls so a busy gateway connects once; idle ones close after 4 s, before common
server idle timeouts (uvicorn's default is 5 s) can race a request on a closing connection."""
CONNECT_TIMEOUT_S = 5.0
"""A server that does not accept a connection by then is down (the call's own timeout may be
shorter)."""
INPUT_STATUSES = frozenset({400, 413, 422})
"""Statuses that blame the request's input: the same input fails on any replica, so they are
never retried. Every other failure (5xx, 404, 429, a refused or broken connection) blames the
replica, and the runtime fails over and may eject it."""


def status_error(replica: object, status: int, body: bytes) -> EnsembleError:
    """The gateway's error for a non-200 answer from a replica's server."""
    message = error_message(body)
    if status in INPUT_STATUSES:
        return InvalidInput(f"{replica} rejected the input ({status}): {message}")
    return MemberFailed(f"{replica} answered {status}: {message}")


class HttpReplica(RemoteReplica):
    """One OIP REST server (this project's `ensemble replica`, Triton, KServe, MLServer).

    Calls share one pooled ``httpx.AsyncClient``; health checks use a one-connection client of
    their own, so a saturated pool cannot make a busy server look dead. A cancelled call (a
    hedge's loser, a request past its deadline) closes its connection; the pool opens another.
    """

    backend = "oip-http"
    transport: httpx.AsyncBaseTransport | None = None
    """The connection layer (None: httpx's own; unit tests set an ``httpx.MockTransport``)."""
    _client: httpx.AsyncClient
    _checker: httpx.AsyncClient

    def _connect(self) -> None:
        path = f"/v2/models/{quote(self.model, safe='')}"
        self._infer_path, self._ready_path = f"{path}/infer", f"{path}/ready"
        base = self.endpoint.rstrip("/")
        connect_s = min(self.timeout_s, CONNECT_TIMEOUT_S)
        credentials = self.credentials
        shared: dict[str, Any] = {
            "base_url": base,
            "transport": self.transport,
            "trust_env": False,  # no proxies from the environment between gateway and replicas
        }
        if credentials is not None:
            shared["headers"] = credentials.headers()
            if base.startswith("https://"):
                shared["verify"] = credentials.ssl_context()
        self._client = httpx.AsyncClient(
            limits=LIMITS, timeout=httpx.Timeout(self.timeout_s, connect=connect_s), **shared
        )
        self._checker = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=self.health.timeout_s,
            **shared,
        )

    async def _disconnect(self) -> None:
        await self._client.aclose()
        await self._checker.aclose()

    async def _infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        timeout_us, priority = outgoing(self.timeout_s)
        parameters = {
            k: v for k, v in (("timeout", timeout_us), ("priority", priority)) if v is not None
        }
        body, header_length = encode_request_body(feed, outputs, parameters)
        headers = {
            "content-type": "application/octet-stream",
            HEADER_LENGTH: str(header_length),
        }
        tracing.inject(headers)  # the call's span is the server's parent
        try:
            response = await self._client.post(self._infer_path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise MemberFailed(f"{self}: {describe(exc)}") from exc
        if response.status_code != 200:
            raise status_error(self, response.status_code, response.content)
        try:
            return decode_response_body(response.content, response.headers.get(HEADER_LENGTH))
        except InvalidInput as exc:  # the server's fault, not the client's
            raise MemberFailed(f"{self} sent a malformed response: {exc}") from exc

    async def _check(self) -> str | None:
        try:
            response = await self._checker.get(self._ready_path)
        except httpx.HTTPError as exc:
            return describe(exc)
        if response.status_code == 200:
            return None
        return f"model ready answered {response.status_code}: {error_message(response.content)}"
