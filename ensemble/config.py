"""The gateway's YAML config: pydantic models, loading, cross-checks and schema export."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from ensemble.config_errors import (
    Loc,
    LocatedError,
    did_you_mean,
    dotted,
    format_errors,
    line_index,
)
from ensemble.errors import ConfigError
from ensemble.model_checks import input_errors
from ensemble.tls import tls_file_errors
from policies import registry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
Name = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
Sha256Hex = Annotated[str, StringConstraints(to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")]
"""A hex SHA-256 digest (either case; kept lower-case)."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True)


LossMode = Literal["timeout", "reset"]


class LinkConfig(StrictModel):
    """Network link from the gateway to a tier; emulated in userspace when ``emulate`` is on.

    With ``emulate`` off (the default, and the setting for production) the values only describe
    the link and no call pays for them. On, every call to a replica on the tier (health checks
    of remote replicas too) crosses the emulated link; the admin API can change it at runtime.
    """

    emulate: bool = Field(
        False,
        description="Emulate this link's behaviour in userspace (tests, demos; off in "
        "production, where the link is real).",
    )
    delay_ms: float = Field(
        0.0, ge=0, le=60_000, description="One-way added delay, ms (a call pays it twice)."
    )
    jitter_ms: float = Field(
        0.0,
        ge=0,
        le=60_000,
        description="Uniform jitter around delay per direction, ms (a total never goes below 0).",
    )
    loss: float = Field(0.0, ge=0, lt=1, description="Probability a call is dropped.")
    loss_mode: LossMode = Field(
        "timeout",
        description="How a dropped call fails: `timeout` (no answer: it fails after "
        "`drop_timeout_ms`, or the call's own timeout when shorter) or `reset` (the connection "
        "is reset: it fails after one one-way delay).",
    )
    drop_timeout_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="How long a dropped call waits before it fails (a connect timeout), ms.",
    )
    bandwidth_mbps: float | None = Field(
        None,
        gt=0,
        description="Bandwidth cap in megabits per second (each call's request and response "
        "take their size over it; calls do not share it); none means uncapped.",
    )
    partitioned: bool = Field(
        False,
        description="The tier is cut off: calls fail at once and health checks fail, until "
        "the admin API heals it (`PUT /admin/links/{tier}`).",
    )
    seed: int = Field(0, description="Seed of jitter and loss (repeatable runs).")


class TierConfig(StrictModel):
    """A placement tier such as edge or cloud: its link and its prices."""

    link: LinkConfig = Field(default_factory=LinkConfig, description="Link to this tier.")
    cost_per_replica_hour: float = Field(
        0.0, ge=0, description="Price of one replica for one hour, in the config's currency."
    )
    cost_per_request: float = Field(0.0, ge=0, description="Price of one member call on this tier.")
    max_replicas: int | None = Field(
        None, ge=1, description="Upper bound on replicas across all members on this tier."
    )


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


# `triton` is another name for `oip-grpc` (Triton's own gRPC endpoint, port 8001 by default).
Backend = Literal["inprocess", "oip-http", "oip-grpc", "triton", "ray", "process"]
REMOTE_BACKENDS: tuple[Backend, ...] = ("oip-http", "oip-grpc", "triton")
"""Backends whose replicas are servers at configured endpoints."""
_ENDPOINT_ONLY = ("endpoints", "remote_model")
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
        n, bounds = len(self.endpoints), self.replicas
        if not bounds.min <= n <= bounds.max:
            raise ValueError(
                f"replicas {{min: {bounds.min}, max: {bounds.max}}} does not fit the {n} "
                f"endpoint(s): a remote placement has exactly one replica per endpoint (the "
                f"gateway does not start or stop remote servers), so min <= {n} <= max; "
                "leave `replicas` out to use the endpoint count"
            )
        return self

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


class MemberConfig(StrictModel):
    """One ensemble member: an ONNX classifier and where its replicas run."""

    name: Name = Field(description="Member name; also addressable as a model of its own.")
    model: Path = Field(description="ONNX file, relative to this config file's directory.")
    card: Path | None = Field(
        None, description="Member card JSON; default: `<model stem>.card.json` beside the model."
    )
    sha256: Sha256Hex | None = Field(
        None,
        description="Hex SHA-256 the model file must have; the gateway refuses a file that "
        "hashes otherwise (on start, reload and every new replica). Needed for a model without "
        "a member card; with a card, the file must match both.",
    )
    probability_output: str | None = Field(
        None, description="Output holding class scores; default: from the card, else inferred."
    )
    output_kind: Literal["probabilities", "logits"] = Field(
        "probabilities", description="`logits` outputs are turned into probabilities by softmax."
    )
    classes: list[int] | list[str] | None = Field(
        None,
        min_length=2,
        description="Class labels in output order; default: the card, the graph's classifier "
        "node, else 0..C-1.",
    )
    placement: list[Placement] = Field(min_length=1, description="Tiers this member runs on.")

    @model_validator(mode="after")
    def _somewhere_always(self) -> MemberConfig:
        # A placement may scale to zero (a burst tier) while another one keeps the member up.
        if all(p.replicas.min == 0 for p in self.placement):
            raise ValueError(
                "placement: every placement has replicas.min 0; keep at least one replica on "
                "some tier (a tier may scale to zero only while another one serves the member)"
            )
        return self

    def replica_names(self) -> list[list[str]]:
        """Per placement, its replicas' names ``TIER/INDEX``, numbered per tier across
        placements: one per endpoint (remote), one per deployment (ray; Ray Serve balances the
        deployment's own replicas, none while scaled to zero), else ``replicas.min`` (none on
        a tier that starts scaled to zero)."""
        counts: dict[str, int] = {}
        names = []
        for place in self.placement:
            if place.remote:
                n = len(place.endpoints or ())
            elif place.backend == "ray":
                n = 1
            else:
                n = place.replicas.min
            first = counts.get(place.tier, 0)
            counts[place.tier] = first + n
            names.append([f"{place.tier}/{i}" for i in range(first, first + n)])
        return names


class PolicySpec(StrictModel):
    """A named policy and its parameters, validated by the policy's own params model."""

    name: str = Field(description="Registered policy name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Policy parameters.")


class ProfileConfig(StrictModel):
    """An operator-defined policy profile: how an ensemble answers."""

    selection: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="all"), description="Which members answer."
    )
    aggregation: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="mean_probability"),
        description="How answers are combined.",
    )
    routing: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="round_robin"),
        description="Which replica of a member takes a call (p2c, peak_ewma, tier_preference...).",
    )
    hedging: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="none"),
        description="When to send a second copy of a slow call to another replica "
        "(`percentile`: after the replica's p95, within a budget of extra calls).",
    )
    retry: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="budget"),
        description="Retrying a failed member call on another replica or tier (`budget`: up to "
        "`max_attempts`, within a budget of extra calls; `none`).",
    )
    on_violation: Literal["reject", "degrade", "reroute", "alert"] = Field(
        "degrade",
        description="When the request's contract is not met (deadline, a member failing, "
        "min_accuracy, max_cost): `reject` answers with an error; `degrade` answers with what "
        "arrived (or the fallback member) and says so; `reroute` first asks the members not yet "
        "asked, then degrades; `alert` answers as is and logs a warning. Always counted.",
    )
    fallback: str | None = Field(
        None,
        description="A member (fast and cheap) asked when nothing else can answer in time: "
        "under `degrade` or `reroute`, started early enough to answer before the deadline.",
    )


class EnsembleConfig(StrictModel):
    """An ensemble served as one model."""

    name: Name = Field(description="Model name clients use.")
    description: str = Field("", description="Free text shown in model metadata.")
    policy: str = Field("default", description="Name of a profile under `policies`.")
    members: list[MemberConfig] = Field(min_length=1, description="The ensemble's members.")


class TlsConfig(StrictModel):
    """TLS on both frontends (HTTPS and gRPC over TLS); with ``client_ca_file``, mutual TLS."""

    cert_file: Path = Field(
        description="PEM certificate chain the gateway presents (its own certificate first), "
        "relative to this config file's directory."
    )
    key_file: Path = Field(
        description="PEM private key of that certificate, unencrypted, relative to this config "
        "file's directory."
    )
    client_ca_file: Path | None = Field(
        None,
        description="PEM CA certificates; when set, every client must present a certificate "
        "signed by one of them (mutual TLS), on both frontends. Relative to this config file's "
        "directory.",
    )

    def resolved(self, base_dir: Path) -> TlsConfig:
        """These settings with relative paths made absolute against ``base_dir``."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base_dir / path).resolve()

        ca = self.client_ca_file
        return TlsConfig(
            cert_file=absolute(self.cert_file),
            key_file=absolute(self.key_file),
            client_ca_file=None if ca is None else absolute(ca),
        )


class ServerConfig(StrictModel):
    """Listening addresses and request limits."""

    host: str = Field("127.0.0.1", description="Address both frontends bind to.")
    http_port: int = Field(8000, ge=0, le=65535, description="OIP REST port; 0 picks a free one.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="OIP gRPC port; 0 picks a free one.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest accepted request body (413 above it)."
    )
    max_batch_size: int = Field(1024, ge=1, description="Largest accepted batch dimension.")
    max_request_elements: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Most tensor elements one request may carry, whatever the model; a "
        "model's own limit is max_batch_size rows of its inputs. A JSON body holding more "
        "values is refused (413) while it arrives, before it is parsed.",
    )
    max_inflate_ratio: float = Field(
        100.0,
        ge=1,
        le=1_000_000,
        description="Largest ratio of a gzip/deflate body's inflated size to its size on the "
        "wire (a compression bomb's is about 1,000); bodies inflating to at most 1 MiB are "
        "exempt. Above it: 413.",
    )
    decode_offload_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Bodies and gRPC messages larger than this are inflated and decoded in a "
        "worker thread, off the event loop; 0 offloads every one.",
    )
    non_finite_inputs: Literal["reject", "allow"] = Field(
        "reject",
        description="Floating-point inputs holding NaN or infinity: `reject` (400 / "
        "INVALID_ARGUMENT) or `allow` (for models that read NaN as a missing value; members "
        "that answer such input with non-finite scores are left out of the answer, never "
        "counted as unavailable).",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Open client connections per frontend (HTTP, gRPC). At the cap a new "
        "HTTP connection closes the oldest one that is not in a request (idle or still "
        "sending its head), or is refused with 503 when every one is busy; gRPC refuses it. "
        "Lowered at start to fit the process's descriptor limit.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest request head: HTTP request line and headers (431 above it), gRPC "
        "metadata.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Time a client has to send a request's head (HTTP) or finish the "
        "connection handshake (gRPC, TLS included) once it started; then it is closed.",
    )
    read_timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Time a client has to send a request body once its head arrived (408 "
        "after it).",
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="A connection with no request in flight for this long is closed (HTTP "
        "keep-alive; gRPC max connection idle).",
    )
    grpc_max_concurrent_streams: int = Field(
        128, ge=1, le=1_000_000, description="Calls one gRPC connection may have open at once."
    )
    grpc_max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="gRPC connections older than this are asked to reconnect (GOAWAY, with "
        "their calls finishing first); none by default.",
    )
    executor_threads: int = Field(
        2, ge=1, le=64, description="Threads running onnxruntime (never the event loop)."
    )
    batching: bool = Field(
        True,
        description="Combine concurrent calls to one model into one onnxruntime call "
        "(only when calls queue up, so an idle gateway adds no wait).",
    )
    batch_max_rows: int = Field(
        256, ge=1, le=65536, description="Most rows one combined onnxruntime call may hold."
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    feedback_window: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Ensemble answers kept for feedback, all ensembles together (oldest "
        "forgotten first); kept only while ENSEMBLE_FEEDBACK_TOKEN enables feedback.",
    )
    feedback_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        le=1024**4,
        description="Memory the answers kept for feedback may hold, all ensembles together "
        "(oldest forgotten first): each answer keeps its members' predicted class per row and "
        "about 400 bytes of bookkeeping.",
    )
    feedback_accuracy_window: int = Field(
        200,
        ge=1,
        le=1_000_000,
        description="Labelled rows per member the rolling accuracy is computed over "
        "(a sliding window).",
    )
    tls: TlsConfig | None = Field(
        None,
        description="Serve HTTPS and gRPC over TLS with these files (plain text when absent).",
    )


class ModelZooConfig(StrictModel):
    """Where the built-in model zoo lives; `serve` builds it when member files are missing."""

    dir: Path = Field(Path("../models/digits"), description="Zoo directory, relative to config.")
    build_if_missing: bool = Field(True, description="Build the zoo on first use.")


class AutoscalingConfig(StrictModel):
    """The control loop: its interval, observation window and policy."""

    interval_s: float = Field(1.0, gt=0, le=3600, description="Seconds between decisions.")
    window_s: float = Field(
        10.0, gt=0, le=86_400, description="Load is averaged over this many seconds."
    )
    policy: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="r3e"),
        description="Autoscaling policy: `r3e` (edge first, burst to the cloud, N+1, scale "
        "bursts to zero, cost budget), `target_inflight` (Ray Serve's rule), `capacity` "
        "(INFaaS), `slo_feedback` (tail latency and error budget).",
    )


class RayConfig(StrictModel):
    """The Ray cluster behind `ray` placements (docs/replicas.md)."""

    app: Name = Field(
        "ensemble",
        description="Name of the Ray Serve application holding the gateway's ray deployments.",
    )
    gateway_tier: Name | None = Field(
        None,
        description="With `ensemble serve --ray-address`, the gateway itself runs as a Serve "
        "deployment on a Ray node offering this tier's custom resource (default: any node).",
    )
    gateway_num_cpus: float = Field(
        1.0,
        ge=0,
        le=256,
        description="With `ensemble serve --ray-address`: CPUs Ray reserves for the gateway "
        "(its in-process members run in its executor threads).",
    )
    deploy_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="Longest the gateway waits for its Ray Serve application to run (e.g. for "
        "a cluster to add a node offering a tier) before it gives up with Serve's explanation.",
    )
    object_store_mb: int = Field(
        256,
        ge=64,
        le=1_048_576,
        description="Object store of the Ray instance the gateway starts when it is not given "
        "--ray-address (tensors here are small).",
    )


def _default_tiers() -> dict[str, TierConfig]:
    return {"edge": TierConfig(), "cloud": TierConfig()}


class GatewayConfig(StrictModel):
    """The whole gateway config file."""

    server: ServerConfig = Field(default_factory=ServerConfig, description="Frontends, limits.")
    tiers: dict[Name, TierConfig] = Field(
        default_factory=_default_tiers, description="Placement tiers by name."
    )
    ensembles: list[EnsembleConfig] = Field(min_length=1, description="Ensembles to serve.")
    policies: dict[Name, ProfileConfig] = Field(
        default_factory=dict, description="Policy profiles; `default` exists unless redefined."
    )
    model_zoo: ModelZooConfig = Field(
        default_factory=ModelZooConfig, description="The built-in model zoo."
    )
    outlier_detection: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="consecutive_failures"),
        description="Ejecting failing replicas from routing, per replica, with half-open "
        "probing (`consecutive_failures`; `none`). A member's last usable replicas are "
        "never all ejected.",
    )
    admission: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="adaptive"),
        description="Admission control before any work on a request (`adaptive`, the "
        "default: at most a limit of requests run at once, the limit following measured "
        "service time, as many wait, the least important shed with 429 / RESOURCE_EXHAUSTED "
        "and Retry-After; `bounded`: the same with fixed `max_running` and `max_waiting`).",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="The control loop (off when absent): it observes every placement, decides "
        "target replicas with the policy within `replicas` bounds, scales in-process and "
        "process placements (drained before removal) and ray placements (Serve replica "
        "counts), observes remote ones, and logs and exports every decision.",
    )
    ray: RayConfig = Field(
        default_factory=RayConfig, description="Ray, for members placed on the `ray` backend."
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from (None when built from data)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Directory relative paths in this config are resolved against."""
        return self._base_dir

    def resolve(self, path: Path) -> Path:
        """``path`` made absolute against the config file's directory."""
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def profile(self, name: str) -> ProfileConfig:
        """The named policy profile (``default`` is built in)."""
        if name in self.policies:
            return self.policies[name]
        if name == "default":
            return ProfileConfig()
        raise KeyError(name)

    def uses_ray(self) -> bool:
        """Some member has a placement on the `ray` backend."""
        return any(
            place.backend == "ray"
            for ens in self.ensembles
            for member in ens.members
            for place in member.placement
        )

    def model_names(self) -> list[str]:
        """Every name a client can address: ensembles, then members."""
        return [e.name for e in self.ensembles] + [
            m.name for e in self.ensembles for m in e.members
        ]

    def zoo_dir(self) -> Path:
        return self.resolve(self.model_zoo.dir)


def _semantic_errors(cfg: GatewayConfig) -> list[LocatedError]:
    """Cross-field problems pydantic cannot see: references, uniqueness, policy params, files."""
    errors: list[LocatedError] = []
    seen: dict[str, Loc] = {}
    for ei, ens in enumerate(cfg.ensembles):
        for loc, name in [(("ensembles", ei, "name"), ens.name)] + [
            (("ensembles", ei, "members", mi, "name"), m.name) for mi, m in enumerate(ens.members)
        ]:
            if name in seen:
                errors.append((loc, f"model name {name!r} is already used at {dotted(seen[name])}"))
            else:
                seen[name] = loc
        if ens.policy not in cfg.policies and ens.policy != "default":
            known = ", ".join(sorted({*cfg.policies, "default"}))
            errors.append(
                (("ensembles", ei, "policy"), f"unknown profile {ens.policy!r}; defined: {known}")
            )
        for mi, member in enumerate(ens.members):
            mloc: Loc = ("ensembles", ei, "members", mi)
            endpoints: dict[str, int] = {}
            for pi, place in enumerate(member.placement):
                for endpoint in place.endpoints or ():
                    if endpoints.setdefault(endpoint, pi) != pi:
                        errors.append(
                            (
                                (*mloc, "placement", pi, "endpoints"),
                                f"endpoint {endpoint!r} is already a replica of this member "
                                f"(placement[{endpoints[endpoint]}])",
                            )
                        )
                if place.tier not in cfg.tiers:
                    known = ", ".join(sorted(cfg.tiers)) or "none"
                    errors.append(
                        (
                            (*mloc, "placement", pi, "tier"),
                            f"unknown tier {place.tier!r}; defined: {known}",
                        )
                    )
            errors.extend(_file_errors(cfg, member, mloc))
    errors.extend(input_errors(cfg))  # what `serve` would refuse, with the member's line
    gateway_tier = cfg.ray.gateway_tier
    if gateway_tier is not None and gateway_tier not in cfg.tiers:
        known = ", ".join(sorted(cfg.tiers)) or "none"
        errors.append((("ray", "gateway_tier"), f"unknown tier {gateway_tier!r}; defined: {known}"))
    members = {m.name for ens in cfg.ensembles for m in ens.members}
    for pname, profile in cfg.policies.items():
        for kind in ("selection", "aggregation", "routing", "hedging", "retry"):
            spec: PolicySpec = getattr(profile, kind)
            errors.extend(_policy_errors(kind, spec, ("policies", pname, kind)))
        if profile.fallback is not None and profile.fallback not in members:
            errors.append(
                (
                    ("policies", pname, "fallback"),
                    f"unknown member {profile.fallback!r}{did_you_mean(profile.fallback, members)}",
                )
            )
    errors.extend(_policy_errors("admission", cfg.admission, ("admission",)))
    if cfg.autoscaling is not None:
        spec = cfg.autoscaling.policy
        errors.extend(_policy_errors("autoscaling", spec, ("autoscaling", "policy")))
    errors.extend(
        _policy_errors("outlier_detection", cfg.outlier_detection, ("outlier_detection",))
    )
    if cfg.server.tls is not None:
        tls = cfg.server.tls.resolved(cfg.base_dir)
        errors.extend(
            (("server", "tls", problem.field), problem.message)
            for problem in tls_file_errors(tls.cert_file, tls.key_file, tls.client_ca_file)
        )
    return errors


def _file_errors(cfg: GatewayConfig, member: MemberConfig, loc: Loc) -> list[LocatedError]:
    path = cfg.resolve(member.model)
    if path.is_file():
        return []
    zoo = cfg.zoo_dir()
    if cfg.model_zoo.build_if_missing and path.parent == zoo:
        return []  # `serve` builds the zoo on first use
    return [((*loc, "model"), f"model file not found: {path}")]


def _policy_errors(kind: str, spec: PolicySpec, loc: Loc) -> list[LocatedError]:
    try:
        entry = registry.lookup(kind, spec.name)  # type: ignore[arg-type]
    except KeyError as exc:
        return [((*loc, "name"), str(exc.args[0]))]
    try:
        entry.params_model.model_validate(spec.params)
    except ValidationError as exc:
        return [((*loc, "params", *e["loc"]), e["msg"]) for e in exc.errors()]
    return []


def parse_config(
    data: Any, *, source: str = "<config>", base_dir: Path | None = None
) -> GatewayConfig:
    """Validate a decoded YAML document; raises ConfigError listing every problem."""
    return _parse(data, source=source, base_dir=base_dir, text=None)


def _parse(data: Any, *, source: str, base_dir: Path | None, text: str | None) -> GatewayConfig:
    lines = line_index(text) if text is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: the document must be a mapping of sections"])
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(source, exc, lines)) from None
    cfg._base_dir = (base_dir or Path.cwd()).resolve()
    problems = _semantic_errors(cfg)
    if problems:
        raise ConfigError(source, format_errors(source, problems, lines))
    return cfg


def parse_yaml(text: str, *, source: str, base_dir: Path) -> GatewayConfig:
    """Parse and fully validate YAML text; errors carry ``source:line:col`` and the YAML path."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(source, [f"{where}: invalid YAML: {exc}"]) from None
    return _parse(data, source=source, base_dir=base_dir, text=text)


def load_config(path: str | Path) -> GatewayConfig:
    """Read, parse and fully validate a YAML config file; raises ConfigError."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(source, [f"{source}: cannot read: {reason or exc}"]) from None
    cfg = parse_yaml(text, source=source, base_dir=path.parent)
    cfg._source = path.resolve()
    return cfg


def json_schema() -> dict[str, Any]:
    """The JSON schema of the config file (what `configs/schema.json` holds)."""
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ensemble gateway configuration"
    return schema
