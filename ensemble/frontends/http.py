"""OIP REST frontend as a plain ASGI app: health, metadata, inference, /metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

import orjson
from pydantic import ValidationError

from ensemble import tracing
from ensemble.auth import ApiKeys, BearerToken, admin_credential
from ensemble.control.lifecycle import ModelLifecycle, requested_version
from ensemble.control.reload import ReloadResult
from ensemble.dataplane.catalog import (
    ConfigTensor,
    ModelConfig,
    model_config,
    repository_index,
    rollout_report,
)
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.errors import (
    Conflict,
    EnsembleError,
    InvalidInput,
    MethodNotAllowed,
    ModelNotReady,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from ensemble.frontends.body import read_body
from ensemble.frontends.deadlines import ReadDeadlines
from ensemble.frontends.limits import Offload, RequestLimits, ValueGuard, counts_values
from ensemble.frontends.routes import LocalRoutes, Reloads, SharedRoutes
from ensemble.metrics import GatewayMetrics
from ensemble.oip.rest import (
    HEADER_LENGTH,
    decode_infer_request,
    dumps,
    encode_infer_response,
    may_set_priority,
)
from ensemble.replicas.links import Link, Links
from ensemble.repository import ServedModel

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
Reply: TypeAlias = tuple[int, list[tuple[bytes, bytes]], bytes]

log = logging.getLogger("ensemble.http")
PROTOCOL = "http"

JSON = b"application/json"
_OK_LIVE = dumps({"live": True})
_OK_READY = dumps({"ready": True})


def _json(status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return status, [(b"content-type", JSON), *(extra or [])], body


class WrongMethod(MethodNotAllowed):
    """A 405 that knows the path's methods, for the ``Allow`` header RFC 9110 requires."""

    def __init__(self, method: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"method {method} not allowed here; use {' or '.join(allowed)}")
        self.allowed = allowed


def error_reply(exc: EnsembleError) -> Reply:
    """The one place an error becomes an HTTP response: OIP's ``{"error": "..."}`` body."""
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(exc, PayloadTooLarge):
        extra.append((b"connection", b"close"))
    if isinstance(exc, WrongMethod):
        extra.append((b"allow", ", ".join(exc.allowed).encode()))
    if isinstance(exc, Unauthorized):
        extra.append((b"www-authenticate", f'Bearer realm="{exc.realm}"'.encode()))
    if isinstance(exc, Overloaded):  # RFC 9110: whole seconds
        extra.append((b"retry-after", str(math.ceil(exc.retry_after_s)).encode()))
    return _json(exc.http_status, dumps({"error": exc.message}), extra)


def model_metadata_doc(model: ServedModel) -> dict[str, Any]:
    meta = model.metadata
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs
        ],
    }


def model_config_doc(config: ModelConfig) -> dict[str, Any]:
    """A Triton-style model configuration (what `tritonclient` get_model_config returns)."""

    def tensors(specs: tuple[ConfigTensor, ...]) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.dims)} for t in specs
        ]

    doc: dict[str, Any] = {
        "name": config.name,
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
    }
    if config.parameters:
        doc["parameters"] = {k: {"string_value": v} for k, v in config.parameters}
    return doc


class HttpFrontend:
    """ASGI application serving the OIP REST API over the shared dispatcher; the admin API
    exists only with a ``reloader`` (a gateway from a config, not a replica server)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        metrics: GatewayMetrics,
        *,
        limits: RequestLimits,
        offload: Offload,
        reloader: Reloads | None = None,
        lifecycle: ModelLifecycle | None = None,
        admin_token: str | None = None,
        feedback_token: str | None = None,
        links: Links | None = None,
        api_keys: ApiKeys | None = None,
        shared: SharedRoutes | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.shared = shared or LocalRoutes(dispatcher, metrics)
        """Where the routes over state all workers share go (this process alone, or all)."""
        self.metrics = metrics
        self.limits = limits
        self.offload = offload
        """The thread large request bodies are inflated and decoded in."""
        self.deadlines = ReadDeadlines(limits.read_timeout_s)
        """The bodies being read, each within ``read_timeout_s``."""
        self.reloader = reloader
        self.admin = admin_credential(admin_token)
        self.feedback = BearerToken(
            "feedback token",
            feedback_token or None,
            "ensemble-feedback",
            "feedback is disabled; start the gateway with ENSEMBLE_FEEDBACK_TOKEN set (its "
            "answers then carry a `feedback_id` to post the true label with)",
        )
        self.lifecycle = lifecycle if reloader is not None else None
        """Loads and unloads models (Triton's repository extension; a gateway from a config)."""
        self.links = links if reloader is not None else None
        """Emulated links the admin API reads and changes (a gateway from a config)."""
        self.api_keys = api_keys or ApiKeys([])
        """Keys the inference routes need (none: they are open)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets are not used
        try:
            status, headers, body = await self._route(scope, receive)
        except EnsembleError as exc:
            self.metrics.record_rejection(PROTOCOL, exc.reason)
            status, headers, body = error_reply(exc)
        except Exception:
            log.exception("unhandled error serving %s %s", scope["method"], scope["path"])
            status, headers, body = _json(500, dumps({"error": "internal server error"}))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive) -> Reply:
        method: str = scope["method"]
        parts = [p for p in scope["path"].split("/") if p]
        if parts[:2] == ["v2", "models"] and len(parts) >= 3:
            return await self._model_route(method, parts[2:], scope, receive)
        if parts == ["metrics"]:
            _expect(method, "GET")
            body, content_type = await self.shared.exposition()
            return 200, [(b"content-type", content_type.encode())], body
        if parts == ["v2"]:
            _expect(method, "GET")
            return _json(200, dumps(self.dispatcher.server_metadata()))
        if parts == ["v2", "health", "live"]:
            _expect(method, "GET")
            return _json(200, _OK_LIVE)
        if parts == ["v2", "health", "ready"]:
            _expect(method, "GET")
            if self.dispatcher.ready():
                return _json(200, _OK_READY)
            return _json(503, dumps({"ready": False, "error": "not ready"}))
        if parts == ["admin", "config"] and self.reloader is not None:
            _expect(method, "PUT")
            self._authorize(scope, self.admin)
            return await self._reload(scope, receive)
        if parts[:2] == ["admin", "links"] and len(parts) <= 3 and self.links is not None:
            return await self._links_route(method, parts[2:], scope, receive)
        if parts[:3] == ["v2", "repository", "models"] and self.lifecycle is not None:
            return await self._repository_route(method, parts[3:], scope, receive)
        if parts[:2] == ["admin", "rollouts"] and len(parts) <= 3 and self.reloader is not None:
            return await self._rollout_route(method, parts[2:], scope, receive)
        if parts == ["v2", "repository", "index"]:
            _expect(method, "GET", "POST")
            self._require_api_key(scope)
            ready_only = False
            if method == "POST":  # Triton's body: {"ready": true} lists ready models only
                raw = await self._read_body(_headers(scope), receive)
                ready_only = _json_object(raw or b"{}").get("ready") is True
            return _json(200, dumps(self._repository_index(ready_only)))
        raise NotFound(f"no route for {method} {scope['path']}")

    async def _model_route(
        self, method: str, rest: list[str], scope: Scope, receive: Receive
    ) -> Reply:
        name, rest = rest[0], rest[1:]
        version: str | None = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise NotFound(f"no route for {method} {scope['path']}")
            version, rest = rest[1], rest[2:]
        if rest not in _OPEN_MODEL_ROUTES:
            self._require_api_key(scope)  # before any body is read or decoded
        if rest == ["infer"]:
            _expect(method, "POST")
            return await self._infer(name, version, scope, receive)
        if rest == ["feedback"] and version is None:
            _expect(method, "POST")
            try:
                self._authorize(scope, self.feedback)  # before any body is read
            except EnsembleError:
                self.dispatcher.feedback.refused(name)
                raise
            body = await self._read_body(_headers(scope), receive)
            return _json(200, dumps(await self.shared.feedback(name, body)))
        if len(rest) > 1:
            raise NotFound(f"no route for {method} {scope['path']}")
        model = self.dispatcher.model(name, version)
        if not rest:
            _expect(method, "GET")
            return _json(200, dumps(model_metadata_doc(model)))
        if rest == ["ready"]:
            _expect(method, "GET")
            if not model.ready():
                raise ModelNotReady(f"model {name!r} is not ready")
            return _json(200, _OK_READY)
        if rest == ["config"]:
            _expect(method, "GET")
            config = model_config(model, self.dispatcher.max_batch_size)
            return _json(200, dumps(model_config_doc(config)))
        raise NotFound(f"no route for {method} {scope['path']}")

    async def _infer(self, name: str, version: str | None, scope: Scope, receive: Receive) -> Reply:
        headers = _headers(scope)
        if not tracing.enabled():
            return await self._answer(name, version, headers, receive)
        route = "/v2/models/{model}" + ("/versions/{version}" if version else "") + "/infer"
        attributes = {
            "http.request.method": "POST",
            "http.route": route,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "ensemble.model": name,
        }
        with tracing.request_span(f"POST {route}", headers, attributes) as span:
            try:
                reply = await self._answer(name, version, headers, receive)
            except Exception as exc:
                status = exc.http_status if isinstance(exc, EnsembleError) else 500
                span.set_attribute("http.response.status_code", status)
                tracing.failed(span, exc, server_fault=status >= 500)
                raise
            span.set_attribute("http.response.status_code", reply[0])
            return reply

    async def _answer(
        self, name: str, version: str | None, headers: dict[str, str], receive: Receive
    ) -> Reply:
        started = self.dispatcher.clock.now()
        header_length = headers.get(HEADER_LENGTH)
        try:
            meta = self.dispatcher.model(name, version).metadata
            limit = self.limits.elements(meta)
            guard = None
            if counts_values(meta):
                json_end = int(header_length) if header_length and header_length.isdigit() else None
                guard = ValueGuard(limit, meta.name, json_end)
            body = await self._read_body(headers, receive, guard)
            if not may_set_priority(body, header_length):
                self.dispatcher.shed_early(name, version)
            request = await self.offload.run(
                len(body),
                lambda: decode_infer_request(body, header_length, name, version, limit),
            )
        except EnsembleError as exc:
            self.dispatcher.refused(name, version, PROTOCOL, exc, started)
            raise
        response = await self.dispatcher.infer(request, PROTOCOL)
        payload, header_length_out = encode_infer_response(response, request)
        if header_length_out is None:
            return _json(200, payload)
        return (
            200,
            [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(header_length_out).encode()),
            ],
            payload,
        )

    async def _read_body(
        self, headers: dict[str, str], receive: Receive, guard: ValueGuard | None = None
    ) -> bytes:
        return await read_body(receive, headers, self.limits, self.offload, self.deadlines, guard)

    def _authorize(self, scope: Scope, credential: BearerToken) -> None:
        given = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = value
        credential.check(given)

    def _require_api_key(self, scope: Scope) -> None:
        if not self.api_keys.required:
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        self.api_keys.check(header, "`Authorization: Bearer <key>`")

    async def _reload(self, scope: Scope, receive: Receive) -> Reply:
        assert self.reloader is not None
        body = await self._read_body(_headers(scope), receive)
        if body.strip():
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput("the config must be UTF-8 YAML") from None
            result = await self.reloader.reload_text(text)
        else:
            result = await self.reloader.reload_file()
        return _reload_reply(result, {"reloaded": True}, result.message)

    async def _repository_route(
        self, method: str, rest: list[str], scope: Scope, receive: Receive
    ) -> Reply:
        """Triton's model repository extension: ``POST /v2/repository/models/{name}/load``
        and ``.../unload`` (the admin token; body ``{"parameters": {"version": "2"}}`` for
        one version)."""
        assert self.lifecycle is not None
        if len(rest) != 2 or rest[1] not in ("load", "unload"):
            raise NotFound(f"no route for {method} {scope['path']}")
        _expect(method, "POST")
        self._authorize(scope, self.admin)
        body = _json_object(await self._read_body(_headers(scope), receive) or b"{}")
        act = self.lifecycle.load if rest[1] == "load" else self.lifecycle.unload
        result = await act(rest[0], requested_version(body.get("parameters", {})))
        # tritonclient shows only `error`: it says everything.
        return _reload_reply(result, {}, "; ".join([result.message, *result.errors]))

    async def _rollout_route(
        self, method: str, rest: list[str], scope: Scope, receive: Receive
    ) -> Reply:
        """``GET /admin/rollouts``: every member's versions, rollout phase and evidence;
        ``POST /admin/rollouts/{member}`` ``{"action": "promote" | "rollback"}`` decides the
        running rollout now (the admin token)."""
        self._authorize(scope, self.admin)
        if not rest:
            _expect(method, "GET")
            return _json(200, dumps({"rollouts": rollout_report(self.dispatcher.repository)}))
        _expect(method, "POST")
        body = _json_object(await self._read_body(_headers(scope), receive))
        action = body.get("action")
        if action not in ("promote", "rollback"):
            raise InvalidInput('send {"action": "promote"} or {"action": "rollback"}')
        decision = self.dispatcher.decide_rollout(rest[0], action)
        return _json(
            200, dumps({"member": decision.member, "version": decision.candidate, "action": action})
        )

    async def _links_route(
        self, method: str, rest: list[str], scope: Scope, receive: Receive
    ) -> Reply:
        """``GET /admin/links``; ``PUT /admin/links/{tier}`` (JSON: settings to change now);
        ``DELETE /admin/links/{tier}`` (back to the config's settings)."""
        assert self.links is not None
        if not rest:
            _expect(method, "GET")
            self._authorize(scope, self.admin)
            return _json(200, dumps({"links": {ln.tier: ln.describe() for ln in self.links}}))
        _expect(method, "PUT", "DELETE")
        self._authorize(scope, self.admin)
        link = self._emulated_link(rest[0])
        changes = None
        if method == "PUT":
            changes = _json_object(await self._read_body(_headers(scope), receive))
        try:
            link = self.shared.change_link(link, changes)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidInput(f"invalid link settings: {problems}") from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        log.warning("link to tier %r changed at runtime: %s", link.tier, link.overrides or "reset")
        return _json(200, dumps({"tier": link.tier, **link.describe()}))

    def _emulated_link(self, tier: str) -> Link:
        assert self.links is not None
        link = self.links.get(tier)
        if link is None:
            known = ", ".join(ln.tier for ln in self.links)
            raise NotFound(f"unknown tier {tier!r}; configured: {known}")
        if not link.emulated:
            raise Conflict(
                f"the link to tier {tier!r} is not emulated; set tiers.{tier}.link.emulate: "
                "true in the config (and reload) to change it at runtime"
            )
        return link

    def _repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        entries = repository_index(self.dispatcher.repository, ready_only=ready_only)
        return [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in entries
        ]


_OPEN_MODEL_ROUTES = (["ready"], ["feedback"])
"""Model routes API keys do not guard: the readiness probe, and feedback (its own token)."""

_WANTED_HEADERS = frozenset(
    {
        b"content-length",
        b"content-encoding",
        HEADER_LENGTH.encode("latin-1"),
        b"traceparent",
        b"tracestate",
    }
)


def _by_index(values: dict[int, str]) -> dict[str, str]:
    return {str(index): value for index, value in sorted(values.items())}


def _headers(scope: Scope) -> dict[str, str]:
    """The few request headers the infer route reads (decoding all of them costs per request)."""
    return {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope["headers"]
        if k in _WANTED_HEADERS
    }


def _reload_reply(result: ReloadResult, done: dict[str, Any], error: str) -> Reply:
    """A reload's answer (a config, a load or unload): 200 with ``done`` and its message, or
    400 with ``error`` and every problem; what each worker did, with several."""
    workers = {} if result.workers is None else {"workers": _by_index(result.workers)}
    if result.ok:
        return _json(200, dumps({**done, "message": result.message, **workers}))
    return _json(400, dumps({"error": error, "errors": result.errors, **workers}))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body must be a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput('the body must be a JSON object, e.g. {"partitioned": true}')
    return doc


def _expect(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise WrongMethod(method, allowed)
