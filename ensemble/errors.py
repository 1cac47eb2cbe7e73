"""One error tree for the gateway; each error knows its HTTP status and gRPC status code."""

from __future__ import annotations

from typing import ClassVar


class EnsembleError(Exception):
    """Root of every error the gateway reports to a client.

    Frontends turn these into responses in exactly one place each: the HTTP status and the
    gRPC status code (by name, as in ``grpc.StatusCode``) live on the class.
    """

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(EnsembleError):
    """The request is malformed or does not match the model's inputs."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(EnsembleError):
    """The model (or the requested version of it) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class NotFound(EnsembleError):
    """The addressed resource (a path, not a model) does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowed(EnsembleError):
    """The path exists but not for this HTTP method."""

    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class PayloadTooLarge(EnsembleError):
    """The request body exceeds the configured size limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"  # what gRPC's own message limit answers


class UnsupportedMediaType(EnsembleError):
    """The request uses a content encoding the gateway does not speak."""

    http_status = 415
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(EnsembleError):
    """The admin API needs `Authorization: Bearer <token>`."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(EnsembleError):
    """The admin token is wrong, or the admin API is disabled."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class ModelNotReady(EnsembleError):
    """The model exists but has no replica able to answer."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ServerShuttingDown(EnsembleError):
    """The gateway is draining and takes no new requests."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(EnsembleError):
    """Shed by admission control: too many requests running and waiting. Clients should retry
    after ``retry_after_s`` (HTTP ``Retry-After``; gRPC trailing metadata ``retry-after``)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EnsembleError):
    """No usable answer arrived before the request's deadline."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class ContractUnmet(EnsembleError):
    """A `reject` profile could not meet the request's min_accuracy or max_cost."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


class MemberFailed(EnsembleError):
    """Every asked member failed, so there is nothing to aggregate."""

    http_status = 502
    grpc_code = "UNAVAILABLE"


class Conflict(EnsembleError):
    """The request cannot apply in the gateway's current state (e.g. a link not emulated)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class ConfigError(Exception):
    """A configuration file is invalid; ``errors`` lists each problem with its YAML path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))
