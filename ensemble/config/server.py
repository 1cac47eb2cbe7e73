"""Config of the gateway process: listening addresses, limits, TLS, and its Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ensemble.config.base import Name, StrictModel


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


class TracingConfig(StrictModel):
    """Traces with OpenTelemetry: a span per inference request, a child span per member call
    attempt; needs the `tracing` extra (`pip install 'ensemble-gateway[tracing]'`)."""

    enabled: bool = Field(False, description="Export traces (off: no cost per request).")
    exporter: Literal["otlp", "console"] = Field(
        "otlp",
        description="`otlp`: OTLP over HTTP to `endpoint` (an OpenTelemetry Collector, Jaeger, "
        "Tempo); `console`: JSON lines on stderr.",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", description="Where OTLP/HTTP spans are sent."
    )
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of traces recorded when a request comes without a sampled parent "
        "(a client's `traceparent` decides for its own).",
    )
    service_name: str = Field(
        "ensemble-gateway", min_length=1, description="The `service.name` resource attribute."
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
        "connection handshake (gRPC) once it started, and (with `tls`) to finish the TLS "
        "handshake once it connected; then it is closed.",
    )
    read_timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Time a client has to send a request body once its head arrived (408 "
        "after it).",
    )
    write_timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Time an answer may wait on a client that does not read it (the "
        "connection's send buffers full); then the connection is closed (HTTP).",
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="A connection with no request in flight for this long is closed (HTTP "
        "keep-alive; gRPC max connection idle).",
    )
    grpc_max_concurrent_streams: int = Field(
        128,
        ge=1,
        le=1_000_000,
        description="Calls one gRPC connection may have open at once; also the requests of one "
        "ModelStreamInfer stream read and not yet answered.",
    )
    grpc_max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="gRPC connections older than this are asked to reconnect (GOAWAY, with "
        "their calls finishing first); none by default.",
    )
    grpc_stack: Literal["grpcio", "uvicorn"] = Field(
        "grpcio",
        description="What serves gRPC: `grpcio` (gRPC core through grpc.aio, the reference "
        "implementation) or `uvicorn` (the gateway's own gRPC framing on uvicorn's HTTP/2, "
        "zttp; under half grpcio's CPU per gateway request in the benchmark; unary calls, "
        "128 calls per connection, answers uncompressed; docs/performance.md).",
    )
    executor_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads running onnxruntime's larger work (work estimated under 1 ms "
        "of CPU runs on the event loop: a hand-off to a thread would cost more).",
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
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry traces (off by default)."
    )

    @model_validator(mode="after")
    def _grpc_stack_limits(self) -> ServerConfig:
        if self.grpc_stack == "uvicorn" and self.grpc_max_concurrent_streams != 128:
            raise ValueError(
                "grpc_max_concurrent_streams: the uvicorn gRPC stack serves 128 calls per "
                "connection (zttp's fixed setting); set 128 or use grpc_stack: grpcio"
            )
        return self


class GatewayReplicas(StrictModel):
    """How many gateway replicas `ensemble serve --ray-address` runs (one per node at most)."""

    min: int = Field(1, ge=1, le=256, description="Gateway replicas kept at all times.")
    max: int = Field(
        1,
        ge=1,
        le=256,
        description="Gateway replicas Ray Serve may grow to on the gateway's own load (above "
        "min: Serve autoscales them on requests in flight per replica).",
    )
    target_ongoing_requests: float = Field(
        16.0,
        gt=0,
        le=100_000,
        description="Requests in flight per gateway replica Serve's autoscaling aims at.",
    )
    upscale_delay_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="How long Serve's autoscaling must want more gateway replicas before it "
        "adds one (Serve's default).",
    )
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        le=86_400,
        description="How long it must want fewer before it removes one (Serve's default).",
    )
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="The window over which Serve averages requests in flight per replica "
        "(Serve's default).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> GatewayReplicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


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
    gateway_replicas: GatewayReplicas = Field(
        default_factory=GatewayReplicas,
        description="With `ensemble serve --ray-address`: the gateway's own replicas, each on "
        "a different node (HTTP through Ray Serve's proxy on every node, gRPC on each "
        "replica's node); they share learning, feedback, link changes, reloads and one "
        "control-loop leader through a Ray actor.",
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
