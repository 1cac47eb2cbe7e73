"""Config of a member's placement: backend, endpoints and credentials, replica bounds, fault
emulation."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from ensemble.config.base import Name, StrictModel


class ReplicaBounds(StrictModel):
    """How many replicas a member keeps on one tier."""

    min: int = Field(
        1,
        ge=0,
        le=256,
        description="Replicas kept at all times; 0: the tier starts with none and the "
        "autoscaler adds them when needed (another placement of the member must keep one).",
    )
    max: int = Field(1, ge=1, le=256, description="Replicas the autoscaler may grow to.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class StragglerConfig(StrictModel):
    """Emulated tail latency for tests and demos: some calls answer late. Off in production."""

    probability: float = Field(ge=0, le=1, description="Share of calls that answer late.")
    delay_ms: float = Field(gt=0, le=60_000, description="How late those calls answer, ms.")
    seed: int = Field(0, description="Seed of the choice of late calls (repeatable runs).")


class DeviceConfig(StrictModel):
    """An emulated slower device for scaling experiments on a small machine: each replica
    serves at most ``concurrency`` calls at once, each holding its slot at least
    ``service_ms`` (like a GPU worker at batch 1). Off in production."""

    service_ms: float = Field(gt=0, le=60_000, description="Least time one call takes, ms.")
    concurrency: int = Field(1, ge=1, le=1024, description="Calls one replica serves at once.")


class FailureConfig(StrictModel):
    """Emulated replica failures for tests and demos: some calls fail. Off in production."""

    probability: float = Field(
        ge=0, le=1, description="Share of calls that fail (1: the replica is dead)."
    )
    seed: int = Field(0, description="Seed of the choice of failing calls (repeatable runs).")


class ReplicaTlsConfig(StrictModel):
    """TLS from the gateway to a remote placement's servers."""

    ca_file: Path | None = Field(
        None,
        description="PEM CA certificates the servers' certificates must chain to (default: "
        "the system's trusted roots), relative to this config file's directory.",
    )
    cert_file: Path | None = Field(
        None,
        description="PEM certificate chain the gateway presents to the servers (mutual TLS), "
        "with key_file; relative to this config file's directory.",
    )
    key_file: Path | None = Field(
        None, description="Unencrypted PEM private key of cert_file, relative likewise."
    )

    @model_validator(mode="after")
    def _pair(self) -> ReplicaTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file come together (a client certificate)")
        return self


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# `triton` is another name for `oip-grpc` (Triton's own gRPC endpoint, port 8001 by default).
Backend = Literal["inprocess", "oip-http", "oip-grpc", "triton", "ray", "process"]
REMOTE_BACKENDS: tuple[Backend, ...] = ("oip-http", "oip-grpc", "triton")
"""Backends whose replicas are servers at configured endpoints."""
_ENDPOINT_ONLY = ("endpoints", "remote_model", "tls", "api_key_env")
_NETWORK_ONLY = (
    "timeout_s",
    "health_check_interval_s",
    "health_check_timeout_s",
    "unhealthy_threshold",
)


class RayDeploymentConfig(StrictModel):
    """How a `ray` placement's Ray Serve deployment is sized."""

    num_cpus: float = Field(
        0.25,
        gt=0,
        le=256,
        description="CPUs Ray reserves for each of the deployment's replicas (an onnxruntime "
        "session runs one thread per call).",
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Calls one Ray Serve replica takes at once; Ray Serve's own default (5) "
        "queues a busy member's calls in Ray's router on a small machine.",
    )
    max_inflight_requests: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Ray requests the gateway keeps in flight per Serve replica; calls arriving "
        "while that many are out wait and go together as one request (rows stacked, up to "
        "server.batch_max_rows), so a busy gateway pays Ray's per-request overhead once per "
        "batch.",
    )


class ProcessReplicaConfig(StrictModel):
    """How a `process` placement's `ensemble replica` children are sized, started and stopped."""

    executor_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads running onnxruntime in each child (one call each); the "
        "autoscaler adds children, so one thread per child keeps a replica a unit of CPU.",
    )
    startup_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest a child may take to print its ready line; a slower one is "
        "killed and the error shows the end of its stderr.",
    )
    stop_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="After SIGTERM, how long a child may take to finish its calls in flight "
        "and exit before it is killed.",
    )


class Placement(StrictModel):
    """Where a member's replicas run and how the gateway reaches them."""

    tier: Name = Field(description="Name of a tier defined under `tiers`.")
    backend: Backend = Field(
        "inprocess",
        description="How replicas are reached: `inprocess` (onnxruntime in the gateway), "
        "`oip-http` (an OIP REST server, binary tensors over pooled keep-alive connections), "
        "`oip-grpc` (an OIP gRPC server, raw tensor contents), `triton` (the same as "
        "`oip-grpc`, for a Triton Inference Server's gRPC endpoint), `ray` (a Ray Serve "
        "deployment the gateway creates, on Ray nodes offering the tier's custom resource, "
        "called by handle), `process` (an `ensemble replica` child process per replica the "
        "gateway starts and stops itself on loopback, called as oip-http).",
    )
    replicas: ReplicaBounds = Field(
        default_factory=ReplicaBounds,
        description="Replica bounds; a remote placement has exactly one replica per endpoint "
        "(default: the endpoint count); a `ray` placement deploys `min` Ray Serve replicas; a "
        "`process` placement starts `min` children.",
    )
    ray: RayDeploymentConfig | None = Field(
        None, description="`ray` backend only: the deployment's size (default: see its fields)."
    )
    process: ProcessReplicaConfig | None = Field(
        None,
        description="`process` backend only: how its children are sized, started and stopped "
        "(default: see its fields).",
    )
    endpoints: list[str] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Remote backends only: one server per replica, `http://HOST:PORT` for "
        "oip-http, `HOST:PORT` for oip-grpc and triton.",
    )
    remote_model: Name | None = Field(
        None,
        description="Remote backends only: the model's name on the server (default: the "
        "member name).",
    )
    tls: ReplicaTlsConfig | None = Field(
        None,
        description="Remote backends only: TLS to the servers. oip-grpc and triton connect "
        "over TLS when it is set; oip-http when an endpoint is https:// (every endpoint must "
        "be, when it is set).",
    )
    api_key_env: str | None = Field(
        None,
        description="Remote backends only: the environment variable holding the key sent as "
        "`Authorization: Bearer <key>` with every call and health check (an `ensemble "
        "replica` started with ENSEMBLE_API_KEYS checks it). Sent only over TLS or to a "
        "loopback endpoint.",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Remote, ray and process backends only: longest a call may take before it "
        "counts as failed (the request's own timeout, when shorter, applies too).",
    )
    health_check_interval_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Remote, ray and process backends only: how often each server's model-ready "
        "endpoint (a ray deployment's `ready` method) is polled; a replica takes calls only "
        "while its checks pass.",
    )
    health_check_timeout_s: float = Field(
        1.0,
        gt=0,
        le=600,
        description="Remote, ray and process backends only: a slower check fails.",
    )
    unhealthy_threshold: int = Field(
        2,
        ge=1,
        le=100,
        description="Remote, ray and process backends only: consecutive failed checks that make a "
        "ready replica unready (one passing check makes it ready again).",
    )
    device: DeviceConfig | None = Field(
        None,
        description="Emulate a slower device per replica (service time, concurrency): what "
        "makes replica counts matter in load tests on a small machine.",
    )
    straggler: StragglerConfig | None = Field(
        None, description="Emulate a straggler: some calls to these replicas answer late."
    )
    failures: FailureConfig | None = Field(
        None, description="Emulate failures: some calls to these replicas fail."
    )

    @property
    def remote(self) -> bool:
        """Replicas are servers at configured endpoints."""
        return self.backend in REMOTE_BACKENDS

    @property
    def networked(self) -> bool:
        """Replicas are reached over the network (call timeouts, active health checks)."""
        return self.backend != "inprocess"

    @model_validator(mode="before")
    @classmethod
    def _one_replica_per_endpoint(cls, data: Any) -> Any:
        # A remote placement's replicas are its endpoints, so the bounds default to their count.
        if isinstance(data, dict) and "replicas" not in data:
            endpoints = data.get("endpoints")
            if data.get("backend") in REMOTE_BACKENDS and isinstance(endpoints, list) and endpoints:
                return {**data, "replicas": {"min": len(endpoints), "max": len(endpoints)}}
        return data

    @model_validator(mode="after")
    def _backend_settings(self) -> Placement:
        if self.ray is not None and self.backend != "ray":
            raise ValueError(f"ray: only for the ray backend, not for {self.backend}")
        if self.process is not None and self.backend != "process":
            raise ValueError(f"process: only for the process backend, not for {self.backend}")
        remote = ", ".join(REMOTE_BACKENDS)
        for keys, applies, which in (
            (
                _NETWORK_ONLY,
                self.networked,
                f"the remote, ray and process backends ({remote}, ray, process)",
            ),
            (_ENDPOINT_ONLY, self.remote, f"the remote backends ({remote})"),
        ):
            given = [key for key in keys if key in self.model_fields_set]
            if given and not applies:
                raise ValueError(f"{', '.join(given)}: only for {which}, not for {self.backend}")
        if not self.remote:
            return self
        if self.endpoints is None:
            example = "http://127.0.0.1:9000" if self.backend == "oip-http" else "127.0.0.1:9001"
            raise ValueError(
                f"backend {self.backend} needs `endpoints`: one server per replica, e.g. "
                f"[{example}]"
            )
        problems = [p for p in map(self._endpoint_problem, self.endpoints) if p]
        if problems:
            raise ValueError("; ".join(problems))
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("endpoints must not repeat (each one is a replica)")
        self._check_credentials(self.endpoints)
        n, bounds = len(self.endpoints), self.replicas
        if not bounds.min <= n <= bounds.max:
            raise ValueError(
                f"replicas {{min: {bounds.min}, max: {bounds.max}}} does not fit the {n} "
                f"endpoint(s): a remote placement has exactly one replica per endpoint (the "
                f"gateway does not start or stop remote servers), so min <= {n} <= max; "
                "leave `replicas` out to use the endpoint count"
            )
        return self

    def _check_credentials(self, endpoints: list[str]) -> None:
        http = self.backend == "oip-http"
        if self.tls is not None and http:
            plain = [e for e in endpoints if urlsplit(e).scheme != "https"]
            if plain:
                raise ValueError(f"tls: for https:// endpoints only, not {plain[0]!r}")
        if self.api_key_env is None:
            return
        if not ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                f"api_key_env {self.api_key_env!r} is not an environment variable name"
            )
        for endpoint in endpoints:
            secure = urlsplit(endpoint).scheme == "https" if http else self.tls is not None
            if not secure and not _loopback(endpoint, http):
                fix = "an https:// endpoint" if http else "`tls`"
                raise ValueError(
                    f"api_key_env: the key would cross the network in clear text to "
                    f"{endpoint!r}; use {fix}, or a loopback endpoint"
                )

    def _endpoint_problem(self, endpoint: str) -> str | None:
        """Why ``endpoint`` is not an address this backend can use (None when it is)."""
        if self.backend == "oip-http":
            url = urlsplit(endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                return f"endpoint {endpoint!r} must be a URL like http://HOST:PORT"
            if url.query or url.fragment:
                return f"endpoint {endpoint!r} must not have a query or fragment"
            try:
                url.port  # noqa: B018  (raises on a malformed port)
            except ValueError:
                return f"endpoint {endpoint!r} has an invalid port"
            return None
        host, sep, port = endpoint.rpartition(":")
        if "://" in endpoint or not sep or not host or not port.isdigit():
            return f"endpoint {endpoint!r} must be HOST:PORT (no scheme) for {self.backend}"
        if not 0 < int(port) < 65536:
            return f"endpoint {endpoint!r} has an invalid port"
        return None


def _loopback(endpoint: str, url: bool) -> bool:
    """Whether ``endpoint`` (a URL, or HOST:PORT) names this machine."""
    host = urlsplit(endpoint).hostname if url else endpoint.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False
