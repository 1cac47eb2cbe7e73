"""One error tree for the gateway; each error knows its HTTP status and gRPC status code."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

REJECTION_REASONS = (
    "invalid_input",
    "too_large",
    "read_timeout",
    "unsupported_encoding",
    "unauthenticated",
    "forbidden",
    "model_not_found",
    "not_found",
    "method_not_allowed",
    "conflict",
    "shed",
    "deadline",
    "contract_unmet",
    "not_ready",
    "draining",
    "members_failed",
    "feedback_unknown_id",
    "feedback_duplicate",
    "worker_unavailable",
    "internal",
)
"""Every error's ``reason``: the label values of ``ensemble_rejected_requests_total``."""

MAX_MESSAGE_CHARS = 2000
"""Longest error message sent to a client: messages quote what the client sent."""


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: for client strings quoted
    in messages and logs (a 10 MB tensor name must not come back whole)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text):,} characters)"


class EnsembleError(Exception):
    """Root of every error the gateway reports to a client.

    Frontends turn these into responses in exactly one place each: the HTTP status and the
    gRPC status code (by name, as in ``grpc.StatusCode``) live on the class. ``reason`` names
    the error in ``ensemble_rejected_requests_total``.
    """

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(EnsembleError):
    """The request is malformed or does not match the model's inputs."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "invalid_input"


class ModelNotFound(EnsembleError):
    """The model (or the requested version of it) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "model_not_found"


class NotFound(EnsembleError):
    """The addressed resource (a path, not a model) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "not_found"


class MethodNotAllowed(EnsembleError):
    """The path exists but not for this HTTP method."""

    http_status = 405
    grpc_code = "UNIMPLEMENTED"
    reason = "method_not_allowed"


class PayloadTooLarge(EnsembleError):
    """The request body exceeds the configured size limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"  # what gRPC's own message limit answers
    reason = "too_large"


class RequestTimeout(EnsembleError):
    """The client did not send its request body in time (``server.read_timeout_s``)."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
    reason = "read_timeout"


class UnsupportedMediaType(EnsembleError):
    """The request uses a content encoding the gateway does not speak."""

    http_status = 415
    grpc_code = "INVALID_ARGUMENT"
    reason = "unsupported_encoding"


class Unauthorized(EnsembleError):
    """The request needs a valid `Authorization: Bearer <credential>` (an API key on the
    inference routes, the admin token on the admin API); ``realm`` names which, for HTTP's
    ``WWW-Authenticate``."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    reason = "unauthenticated"

    def __init__(self, message: str, realm: str = "ensemble") -> None:
        super().__init__(message)
        self.realm = realm


class Forbidden(EnsembleError):
    """The admin token is wrong, or the admin API is disabled."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    reason = "forbidden"


class ModelNotReady(EnsembleError):
    """The model exists but has no replica able to answer."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "not_ready"


class ServerShuttingDown(EnsembleError):
    """The gateway is draining and takes no new requests."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "draining"


class WorkerUnavailable(EnsembleError):
    """Another worker of the gateway did not answer (it is restarting): retry."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "worker_unavailable"


class Overloaded(EnsembleError):
    """Shed by admission control: too many requests running and waiting. Clients should retry
    after ``retry_after_s`` (HTTP ``Retry-After``; gRPC trailing metadata ``retry-after``)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "shed"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EnsembleError):
    """No usable answer arrived before the request's deadline."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    reason = "deadline"


class ContractUnmet(EnsembleError):
    """A `reject` profile could not meet the request's min_accuracy or max_cost."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"
    reason = "contract_unmet"


class MemberFailed(EnsembleError):
    """Every asked member failed, so there is nothing to aggregate."""

    http_status = 502
    grpc_code = "UNAVAILABLE"
    reason = "members_failed"


class Conflict(EnsembleError):
    """The request cannot apply in the gateway's current state (e.g. a link not emulated)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"
    reason = "conflict"


class ModelIntegrityError(EnsembleError):
    """A model file does not hash to the SHA-256 its card or config pins (or nothing pins it).

    Raised while models load (gateway start, reload, a new replica), never by a request: the
    config that names the file is refused. ``problems`` has one line per refused file and
    ``members`` the members they belong to, in the same order.
    """

    def __init__(self, problems: list[str], members: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.members = members


class ConfigError(Exception):
    """A configuration file is invalid; ``errors`` lists each problem with its YAML path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))


def require_extra(module: str, extra: str, what: str) -> None:
    """EnsembleError naming the extra to install when ``module`` is not installed (the slim
    install leaves out Ray, the zoo's training stack and plotting)."""
    if importlib.util.find_spec(module) is None:
        raise EnsembleError(
            f"{what} needs {module}, which this install does not have: "
            f"pip install 'ensemble-gateway[{extra}]'"
        )
