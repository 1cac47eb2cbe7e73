"""The oip-grpc backend: a replica on an OIP gRPC server, raw tensor contents over one channel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from ensemble import tracing
from ensemble.errors import EnsembleError, InvalidInput, MemberFailed
from ensemble.oip.datatypes import numpy_to_oip
from ensemble.oip.grpc import decode_infer_response
from ensemble.replicas.credentials import ClientCredentials
from ensemble.replicas.remote import Outputs, RemoteReplica
from ensemble.scope import outgoing

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # After a server goes away, gRPC reconnects with exponential backoff (up to 120 s by
    # default); capped at 1 s, a restarted server is found again within about a second.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
GRPC_DEADLINE_GRACE_S = 0.05
"""How long after the request's deadline a call's gRPC deadline is."""
INPUT_CODES = frozenset({"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"})
"""Status codes that blame the request's input (never retried); any other blames the replica."""


def status_error(replica: object, exc: InferenceServerException) -> EnsembleError:
    """The gateway's error for a failed RPC (tritonclient reports the code as its status)."""
    status = exc.status() or "no status"
    message = exc.message() or "no message"
    if status in INPUT_CODES:
        return InvalidInput(f"{replica} rejected the input ({status}): {message}")
    return MemberFailed(f"{replica} failed ({status}): {message}")


Connect = Callable[[str, ClientCredentials | None], Any]
"""Makes the client for an endpoint: ``tritonclient.grpc.aio.InferenceServerClient``'s shape."""


def _new_client(endpoint: str, credentials: ClientCredentials | None) -> Any:
    if credentials is None or not credentials.tls:
        return grpcaio.InferenceServerClient(endpoint, channel_args=CHANNEL_OPTIONS)
    return grpcaio.InferenceServerClient(
        endpoint, creds=credentials.grpc_credentials(), channel_args=CHANNEL_OPTIONS
    )


class GrpcReplica(RemoteReplica):
    """One OIP gRPC server (this project's `ensemble replica`, Triton, KServe).

    Calls and health checks share one HTTP/2 channel (calls multiplex on it, so a busy server
    still answers its ModelReady). Cancelling a call cancels its RPC.
    """

    backend = "oip-grpc"
    connect: Connect = staticmethod(_new_client)
    """Makes the client (unit tests set a fake)."""
    _client: Any
    _headers: dict[str, str]

    def _connect(self) -> None:
        self._client = self.connect(self.endpoint, self.credentials)
        self._headers = {} if self.credentials is None else self.credentials.headers()

    async def _disconnect(self) -> None:
        await self._client.close()

    async def _infer(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
        inputs = []
        for name, array in feed.items():
            tensor = grpcclient.InferInput(name, list(array.shape), numpy_to_oip(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        wanted = [grpcclient.InferRequestedOutput(n) for n in outputs]
        timeout_us, priority = outgoing(self.timeout_s)
        # The gRPC deadline is a backstop a little after the request's own (sent as Triton's
        # `timeout` parameter): the gateway's timers cancel the call first, so a deadline
        # the request missed does not count as the replica's failure.
        deadline_s = None if timeout_us is None else timeout_us / 1e6 + GRPC_DEADLINE_GRACE_S
        headers = dict(self._headers)
        tracing.inject(headers)  # the call's span is the server's parent (gRPC metadata)
        try:
            result = await self._client.infer(
                self.model,
                inputs,
                outputs=wanted,
                priority=priority or 0,
                timeout=timeout_us,
                client_timeout=deadline_s,
                **({"headers": headers} if headers else {}),
            )
        except InferenceServerException as exc:
            raise status_error(self, exc) from exc
        try:
            return decode_infer_response(result.get_response())
        except InvalidInput as exc:  # the server's fault, not the client's
            raise MemberFailed(f"{self} sent a malformed response: {exc}") from exc

    async def _check(self) -> str | None:
        try:
            ready = await self._client.is_model_ready(
                self.model,
                client_timeout=self.health.timeout_s,
                **({"headers": self._headers} if self._headers else {}),
            )
        except InferenceServerException as exc:
            return f"{exc.status() or 'error'}: {exc.message()}"
        return None if ready else "model not ready"
