"""OIP gRPC frontend: the GRPCInferenceService servicer over a Dispatcher, and its server."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn, Protocol, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2

from ensemble import tracing
from ensemble.auth import ApiKeys, BearerToken, admin_credential
from ensemble.control.lifecycle import ModelLifecycle, requested_version
from ensemble.control.reload import ReloadResult
from ensemble.dataplane.catalog import ConfigTensor, ModelConfig, model_config, repository_index
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.errors import EnsembleError, InvalidInput, Overloaded
from ensemble.frontends.connections import ConnectionLimits
from ensemble.frontends.grpc_stream import StreamInfer
from ensemble.frontends.limits import Offload, RequestLimits
from ensemble.oip.grpc import decode_infer_request, encode_infer_response
from ensemble.tls import TlsFiles
from ensemble.types import ModelMetadata, TensorSpec

logger = logging.getLogger(__name__)

PROTOCOL: Final = "grpc"
SERVICE_NAME: Final = "inference.GRPCInferenceService"
GUARDED: Final = frozenset({"ModelInfer", "ModelMetadata", "ModelConfig", "RepositoryIndex"})
"""RPCs that need an API key when the gateway has some (health and server metadata stay open)."""

TRACE_KEYS: Final = frozenset({"traceparent", "tracestate"})
"""The metadata a client's trace context comes in (W3C Trace Context)."""
SERVER_FAULTS: Final = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""Codes that mark a server span as failed (the client's own mistakes do not)."""

_CONFIG_TYPES: Final[dict[str, Any]] = {
    "BOOL": model_config_pb2.TYPE_BOOL,
    "UINT8": model_config_pb2.TYPE_UINT8,
    "UINT16": model_config_pb2.TYPE_UINT16,
    "UINT32": model_config_pb2.TYPE_UINT32,
    "UINT64": model_config_pb2.TYPE_UINT64,
    "INT8": model_config_pb2.TYPE_INT8,
    "INT16": model_config_pb2.TYPE_INT16,
    "INT32": model_config_pb2.TYPE_INT32,
    "INT64": model_config_pb2.TYPE_INT64,
    "FP16": model_config_pb2.TYPE_FP16,
    "FP32": model_config_pb2.TYPE_FP32,
    "FP64": model_config_pb2.TYPE_FP64,
    "BYTES": model_config_pb2.TYPE_STRING,
}


class GrpcServer(Protocol):
    """A running gRPC frontend, whichever stack serves it."""

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let those in flight finish within ``grace`` seconds, close."""


_Handler: TypeAlias = Callable[["InferenceServicer", Any, Any], Awaitable[Any]]


def _rpc(method: _Handler) -> _Handler:
    """The one place where errors become gRPC statuses, wrapped around every implemented RPC."""

    @functools.wraps(method)
    async def handle(self: InferenceServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except EnsembleError as exc:
            self.metrics.record_rejection(PROTOCOL, exc.reason)
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # The client gets no internals (paths, stack frames); the operator gets the traceback.
            logger.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the gateway log")

    return handle


async def _abort(context: Any, exc: EnsembleError) -> NoReturn:
    """End the call with the status of ``exc`` (and ``retry-after`` when shed)."""
    if isinstance(exc, Overloaded):
        retry = str(math.ceil(exc.retry_after_s))
        await context.abort(exc_code(exc), exc.message, (("retry-after", retry),))
    await context.abort(exc_code(exc), exc.message)
    raise AssertionError("context.abort returned")  # it always raises


def exc_code(exc: EnsembleError) -> grpc.StatusCode:
    """The gRPC status of a gateway error."""
    return grpc.StatusCode[exc.grpc_code]


def _tensor_metadata(spec: TensorSpec) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )


def model_metadata_response(meta: ModelMetadata) -> Any:
    """A ModelMetadataResponse for one model."""
    return service_pb2.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[_tensor_metadata(s) for s in meta.inputs],
        outputs=[_tensor_metadata(s) for s in meta.outputs],
    )


def model_config_message(config: ModelConfig) -> Any:
    """The catalog's model configuration as Triton's ModelConfig message."""

    def tensors(kind: Any, specs: tuple[ConfigTensor, ...]) -> list[Any]:
        return [kind(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.dims) for t in specs]

    return model_config_pb2.ModelConfig(
        name=config.name,
        platform=config.platform,
        max_batch_size=config.max_batch_size,
        input=tensors(model_config_pb2.ModelInput, config.inputs),
        output=tensors(model_config_pb2.ModelOutput, config.outputs),
        parameters={
            k: model_config_pb2.ModelParameter(string_value=v) for k, v in config.parameters
        },
    )


class InferenceServicer:
    """GRPCInferenceService over a Dispatcher; RPCs not defined here answer UNIMPLEMENTED."""

    IMPLEMENTED: Final = (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "RepositoryIndex",
        "ModelInfer",
    )

    REPOSITORY: Final = ("RepositoryModelLoad", "RepositoryModelUnload")
    """Triton's repository extension: served with a lifecycle (a gateway from a config)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        limits: RequestLimits,
        offload: Offload,
        lifecycle: ModelLifecycle | None = None,
        admin: BearerToken | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self.lifecycle = lifecycle
        self.admin = admin or admin_credential(None)
        self.metrics = dispatcher.metrics
        self.limits = limits
        self.offload = offload
        """The thread large messages are parsed and decoded in."""

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        assert self.lifecycle is not None
        await self._repository_change(self.lifecycle.load, request, context)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        assert self.lifecycle is not None
        await self._repository_change(self.lifecycle.unload, request, context)
        return service_pb2.RepositoryModelUnloadResponse()

    async def _repository_change(
        self, act: Callable[[str, str | None], Awaitable[ReloadResult]], request: Any, context: Any
    ) -> None:
        """Load or unload with the admin token (metadata ``authorization: Bearer <token>``);
        a change the config cannot take is FAILED_PRECONDITION."""
        metadata = context.invocation_metadata()
        self.admin.check(next((v for k, v in metadata if k == "authorization"), None))
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in request.parameters.items()
        }
        result = await act(request.model_name, requested_version(parameters))
        if not result.ok:
            detail = "; ".join(result.errors) or result.message
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, detail[:2000])

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=self._dispatcher.live())

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self._dispatcher.ready())

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self._dispatcher.model_ready(request.name, request.version or None)
        return service_pb2.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self._dispatcher.server_metadata()
        return service_pb2.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = self._dispatcher.model(request.name, request.version or None)
        return model_metadata_response(model.metadata)

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        model = self._dispatcher.model(request.name, request.version or None)
        config = model_config(model, self._dispatcher.max_batch_size)
        return service_pb2.ModelConfigResponse(config=model_config_message(config))

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        # There is a single repository, so repository_name is not consulted.
        entries = repository_index(self._dispatcher.repository, ready_only=request.ready)
        return service_pb2.RepositoryIndexResponse(
            models=[
                service_pb2.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self.infer(request, context)

    async def parse_infer(self, raw: bytes) -> Any:
        """A serialized ModelInferRequest parsed (off the loop when large); InvalidInput when
        it is malformed."""
        return await self.offload.run(len(raw), lambda: _parse(service_pb2.ModelInferRequest, raw))

    async def authorize(self, context: Any, keys: ApiKeys) -> None:
        """End the call UNAUTHENTICATED unless its metadata carries one of ``keys``."""
        metadata = context.invocation_metadata()
        header = next((v for k, v in metadata if k == "authorization"), None)
        try:
            keys.check(header, "metadata `authorization: Bearer <key>`")
        except EnsembleError as exc:
            await self.refuse(context, exc)

    async def refuse(self, context: Any, exc: EnsembleError) -> NoReturn:
        """End the call with ``exc``'s status, counted as a rejection."""
        self.metrics.record_rejection(PROTOCOL, exc.reason)
        await _abort(context, exc)

    async def infer(self, request: Any, context: Any, method: str = "ModelInfer") -> Any:
        """One ModelInfer request answered (a span of its own, named after the RPC ``method``
        that carried it, when tracing is on); the gateway's errors raised."""
        if not tracing.enabled():
            return await self._infer(request, context)
        carrier = {k: v for k, v in context.invocation_metadata() if k in TRACE_KEYS}
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE_NAME,
            "rpc.method": method,
            "ensemble.model": request.model_name,
        }
        with tracing.request_span(f"{SERVICE_NAME}/{method}", carrier, attributes) as span:
            try:
                response = await self._infer(request, context)
            except Exception as exc:
                code = exc_code(exc) if isinstance(exc, EnsembleError) else grpc.StatusCode.INTERNAL
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                tracing.failed(span, exc, server_fault=code in SERVER_FAULTS)
                raise
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            return response

    async def _infer(self, request: Any, context: Any) -> Any:
        started = self._dispatcher.clock.now()
        name, version = request.model_name, request.model_version or None
        try:
            limit = self.limits.elements(self._dispatcher.model(name, version).metadata)
            if "priority" not in request.parameters:
                self._dispatcher.shed_early(name, version)
            infer_request = await self.offload.run(
                _declared_bytes(request), lambda: decode_infer_request(request, limit)
            )
        except EnsembleError as exc:
            self._dispatcher.refused(name, version, PROTOCOL, exc, started)
            raise
        infer_request.transport_deadline_s = context.time_remaining()
        response = await self._dispatcher.infer(infer_request, PROTOCOL)
        return encode_infer_response(response)


UnaryHandler: TypeAlias = Callable[[bytes, Any], Awaitable[Any]]
"""One RPC: its serialized request and a call context in, its response message out."""


def rpc_handlers(
    dispatcher: Dispatcher,
    limits: RequestLimits,
    offload: Offload | None = None,
    api_keys: ApiKeys | None = None,
    lifecycle: ModelLifecycle | None = None,
    admin: BearerToken | None = None,
) -> dict[str, tuple[UnaryHandler, Any]]:
    """The RPCs the gateway serves by name, each with its response type: handlers that parse
    the request themselves, so a malformed message is the client's fault (INVALID_ARGUMENT)
    instead of a stack's UNKNOWN with parser internals; with ``api_keys`` that require a key,
    a ``GUARDED`` call without one is refused first, before its message is parsed. Either gRPC
    stack serves these (grpc.aio here, uvicorn's HTTP/2 in ``grpc_h2``)."""
    servicer = InferenceServicer(dispatcher, limits, offload or Offload(limits), lifecycle, admin)
    keys = api_keys if api_keys is not None and api_keys.required else None
    served = [
        *servicer.IMPLEMENTED,
        *(servicer.REPOSITORY if servicer.lifecycle is not None else ()),
    ]
    return {
        name: (
            _unary(servicer, name, keys if name in GUARDED else None),
            getattr(service_pb2, f"{name}Response"),
        )
        for name in served
    }


def _unary(servicer: InferenceServicer, name: str, keys: ApiKeys | None) -> UnaryHandler:
    request_type = getattr(service_pb2, f"{name}Request")
    method = getattr(servicer, name)

    async def handle(raw: bytes, context: Any) -> Any:
        if keys is not None:
            await servicer.authorize(context, keys)
        try:
            request = await servicer.offload.run(len(raw), lambda: _parse(request_type, raw))
        except EnsembleError as exc:
            await servicer.refuse(context, exc)
        return await method(request, context)

    return handle


def _parse(request_type: Any, raw: bytes) -> Any:
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidInput(f"malformed {request_type.__name__} message: {exc}") from None


def _declared_bytes(request: Any) -> int:
    """About the bytes a ModelInferRequest's tensors hold, by their shapes (4 per element)."""
    elements: int = sum(max(0, math.prod(inp.shape)) for inp in request.inputs)
    return 4 * elements


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc_server(
    dispatcher: Dispatcher,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    limits: RequestLimits | None = None,
    offload: Offload | None = None,
    connections: ConnectionLimits | None = None,
    tls: TlsFiles | None = None,
    api_keys: ApiKeys | None = None,
    reuse_port: bool = False,
    lifecycle: ModelLifecycle | None = None,
    admin: BearerToken | None = None,
) -> tuple[GrpcioServer, int]:
    """Bind ``host:port`` (0 picks a free port), start serving, return the server and its port.

    ``max_message_bytes`` caps received messages (responses are the gateway's own). gRPC
    itself rejects an oversized request with RESOURCE_EXHAUSTED before it reaches the
    servicer, so such requests never show up in the gateway's request metrics. Stop the
    server with ``await server.stop(grace)``.

    With ``tls`` the port speaks TLS only (mutual TLS when it has a client CA); with
    ``api_keys`` that require a key, the RPCs in ``GUARDED`` need one. With ``reuse_port``
    the gateway's workers share the port (the kernel spreads connections over them).
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # gRPC defaults to SO_REUSEPORT, which would let a second gateway share a busy port
        # silently and split the traffic; a busy port must be an error instead (the
        # supervisor of several workers checked the port is free before they share it).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *(connections or ConnectionLimits()).grpc_options(),
    ]
    server = grpc.aio.server(options=options)
    limits = limits or RequestLimits(max_bytes=max_message_bytes)
    offload = offload or Offload(limits)
    rpcs = rpc_handlers(dispatcher, limits, offload, api_keys, lifecycle, admin)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=response.SerializeToString
        )
        for name, (handle, response) in rpcs.items()
    }
    stream = StreamInfer(
        InferenceServicer(dispatcher, limits, offload, lifecycle, admin),
        api_keys if api_keys is not None and api_keys.required else None,
        (connections or ConnectionLimits()).grpc_max_concurrent_streams,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream.handle,
        request_deserializer=None,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    address = _address(host, port)
    try:
        if tls is None:
            bound: int = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.private_key, tls.cert_chain)],
                root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None,
            )
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpcio raises rather than returning 0 on recent versions
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    return GrpcioServer(server, stream), bound


class GrpcioServer:
    """The running grpc.aio server: ``stop(grace)`` ends its streams first (``drain``)."""

    def __init__(self, server: grpc.aio.Server, stream: StreamInfer) -> None:
        self.server = server
        self.stream = stream

    async def stop(self, grace: float | None) -> None:
        self.stream.drain()
        await self.server.stop(grace)
