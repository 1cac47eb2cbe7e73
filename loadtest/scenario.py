"""Scenario YAML: pydantic models, loading, and errors that name their file, line and YAML path."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ensemble.auth import FEEDBACK_TOKEN_ENV
from ensemble.config_errors import Loc, LocatedError, format_errors, line_index
from loadtest import faults

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 10_000_000
MAX_RPS = 100_000.0
SHAPES = ("constant", "poisson", "step", "spike", "sinusoidal", "trace", "closed")

Scalar: TypeAlias = bool | int | float | str
Duration = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]
Rate = Annotated[float, Field(ge=0, le=MAX_RPS)]
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_PERCENTILE = re.compile(r"^(p\d{1,2}(\.\d{1,3})?|max)$")


class ScenarioError(Exception):
    """The scenario cannot be used; ``errors`` holds one ``file:line:col: path: message`` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Strict(BaseModel):
    """Base of every section: unknown keys are errors, nothing is mutated after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Strict):
    """What to load: a running gateway (`url`, `grpc`) or a config the harness serves itself."""

    url: str | None = Field(None, description="OIP REST base URL, e.g. http://127.0.0.1:8000.")
    grpc: str | None = Field(None, description="OIP gRPC address HOST:PORT, e.g. 127.0.0.1:8001.")
    config: Path | None = Field(
        None,
        description="Gateway config the harness serves with `ensemble serve` on free ports and "
        "stops with SIGTERM at the end (relative to the scenario file).",
    )
    startup_timeout_s: float = Field(120, gt=0, le=600, description="Wait for the ready line.")
    stop_timeout_s: float = Field(60, gt=0, le=600, description="Wait for exit after SIGTERM.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"http://[A-Za-z0-9.\-\[\]:]+:\d{1,5}/?", value):
            raise ValueError("must look like http://HOST:PORT (plain HTTP/1.1, no path)")
        return value.rstrip("/") if value else value

    @field_validator("grpc")
    @classmethod
    def _grpc(cls, value: str | None) -> str | None:
        if value is not None and not _HOST_PORT.fullmatch(value):
            raise ValueError("must look like HOST:PORT")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        if self.config is not None and (self.url or self.grpc):
            raise ValueError("give either `config` or `url`/`grpc`, not both")
        if self.config is None and not (self.url or self.grpc):
            raise ValueError("give `config` (the harness serves it) or `url`/`grpc`")
        return self


class RequestSpec(Strict):
    """What each request carries and how the answer is checked."""

    endpoint: Literal["infer", "live"] = Field(
        "infer",
        description="`infer` sends test samples; `live` calls the liveness route (GET "
        "/v2/health/live or ServerLive) to measure the generator's ceiling.",
    )
    input: str = Field("input", description="Input tensor name.")
    datatype: Literal["FP32"] = Field("FP32", description="Input datatype.")
    output: str = Field("label", description="Output whose values are checked against labels.")
    batch_size: int = Field(1, ge=1, le=1024, description="Samples per request.")
    data: Path | None = Field(
        None,
        description="npz with float32 `X` [n, features] and labels `y` (relative to the "
        "scenario file); default: the model zoo's test split, built if missing.",
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="Client timeout per request.")


class _OpenBase(Strict):
    duration_s: Duration = Field(description="How long arrivals are generated, seconds.")


class ConstantLoad(_OpenBase):
    """Evenly spaced arrivals at a fixed rate."""

    shape: Literal["constant"]
    rps: Rate = Field(description="Requests per second.")


class PoissonLoad(_OpenBase):
    """Poisson arrivals (exponential gaps) at a mean rate."""

    shape: Literal["poisson"]
    rps: Rate = Field(description="Mean requests per second.")


class _Modulated(_OpenBase):
    arrivals: Literal["poisson", "uniform"] = Field(
        "poisson", description="Poisson arrivals around the rate curve, or evenly spaced ones."
    )


class Step(Strict):
    """From `at_s` on, the rate is `rps`."""

    at_s: float = Field(ge=0, le=MAX_DURATION_S, description="Start of this step, seconds.")
    rps: Rate = Field(description="Rate from this step on.")


class StepLoad(_Modulated):
    """A staircase: the rate of the last step that has started."""

    shape: Literal["step"]
    steps: list[Step] = Field(min_length=1, description="Steps; the first at 0, then increasing.")

    @model_validator(mode="after")
    def _ordered(self) -> StepLoad:
        if self.steps[0].at_s != 0:
            raise ValueError("the first step must start at at_s: 0")
        if any(b.at_s <= a.at_s for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must have strictly increasing at_s")
        return self


class SpikeLoad(_Modulated):
    """A base rate with one burst."""

    shape: Literal["spike"]
    base_rps: Rate = Field(description="Rate outside the spike.")
    spike_rps: Rate = Field(description="Rate during the spike.")
    spike_at_s: float = Field(ge=0, le=MAX_DURATION_S, description="Spike start, seconds.")
    spike_duration_s: Duration = Field(description="Spike length, seconds.")


class SinusoidalLoad(_Modulated):
    """A diurnal curve: mean - amplitude * cos(2 pi t / period), so it starts at the trough."""

    shape: Literal["sinusoidal"]
    mean_rps: Rate = Field(description="Mean rate.")
    amplitude_rps: Rate = Field(description="Swing around the mean; at most the mean.")
    period_s: Duration = Field(description="One full cycle ('a day'), seconds.")

    @model_validator(mode="after")
    def _non_negative(self) -> SinusoidalLoad:
        if self.amplitude_rps > self.mean_rps:
            raise ValueError("amplitude_rps must not exceed mean_rps (rates cannot go negative)")
        return self


class TraceLoad(Strict):
    """Replay recorded arrival timestamps (seconds, one per line, `#` comments allowed)."""

    shape: Literal["trace"]
    path: Path = Field(description="Timestamp file, relative to the scenario file.")
    speed: float = Field(1.0, gt=0, le=1000, description="Replay speed; 2 = twice as fast.")
    duration_s: Duration | None = Field(None, description="Stop after this long; default: trace.")


class ClosedLoad(Strict):
    """N clients, each sending its next request when the previous one answers."""

    shape: Literal["closed"]
    concurrency: int = Field(ge=1, le=4096, description="Concurrent clients.")
    duration_s: Duration = Field(description="How long clients keep sending, seconds.")
    think_time_s: float = Field(0.0, ge=0, le=60, description="Pause between answer and next.")


OpenLoad: TypeAlias = ConstantLoad | PoissonLoad | StepLoad | SpikeLoad | SinusoidalLoad | TraceLoad
Load = Annotated[OpenLoad | ClosedLoad, Field(discriminator="shape")]


class ContractParameters(Strict):
    """OIP request parameters: the gateway's contract keys, plus free-form `custom` ones."""

    timeout: int | None = Field(None, ge=0, description="Deadline in microseconds.")
    priority: int | None = Field(None, ge=0, description="Lower is more important.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Accuracy the answer needs.")
    max_cost: float | None = Field(None, ge=0, description="Cost budget for the request.")
    tier: Literal["edge", "cloud", "any"] | None = Field(None, description="Where data may go.")
    policy: str | None = Field(None, min_length=1, description="Policy profile name.")
    custom: dict[str, Scalar] = Field(default_factory=dict, description="Other parameters.")

    def as_dict(self) -> dict[str, Scalar]:
        known = self.model_dump(exclude={"custom"}, exclude_none=True)
        return {**self.custom, **known}


class RequestClass(Strict):
    """A kind of request in the traffic mix."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name used in the report.")
    weight: float = Field(1.0, gt=0, description="Relative share of requests.")
    parameters: ContractParameters = Field(
        default_factory=ContractParameters, description="Sent as the request's `parameters`."
    )


class Slo(Strict):
    """Assertions checked at the end; any failure makes the command exit 1."""

    latency_ms: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Upper bounds on latency percentiles of successful answers, "
        "keyed p50, p95, p99, p99.9, max.",
    )
    max_error_rate: float | None = Field(None, ge=0, le=1, description="Errors / requests.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Correct / answered samples.")
    min_goodput_rps: float | None = Field(None, ge=0, description="Good answers per second.")
    min_throughput_rps: float | None = Field(None, ge=0, description="Answers per second.")
    goodput_latency_ms: float | None = Field(
        None,
        gt=0,
        description="A good answer is correct and within this; default: largest latency_ms.",
    )

    @field_validator("latency_ms")
    @classmethod
    def _keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if not _PERCENTILE.fullmatch(key) or (key != "max" and float(key[1:]) <= 0):
                raise ValueError(f"unknown percentile {key!r}; use p50, p95, p99, p99.9 or max")
        return value

    def latency_budget_ms(self) -> float | None:
        if self.goodput_latency_ms is not None:
            return self.goodput_latency_ms
        return max(self.latency_ms.values()) if self.latency_ms else None


class FaultSpec(Strict):
    """A timed event handled by a registered fault hook."""

    at_s: float = Field(ge=0, le=MAX_DURATION_S, description="When, seconds after the start.")
    name: str = Field(description=f"Hook name: {', '.join(faults.hook_names())}.")
    params: dict[str, Any] = Field(default_factory=dict, description="The hook's parameters.")


class FeedbackSpec(Strict):
    """Post the true labels of answered requests to the gateway's feedback API as the run goes.

    For a `share` of the successful answers the generator posts
    `{"feedback_id": ..., "label": [...]}` (the `feedback_id` the answer carried) to
    `POST /v2/models/{model}/feedback` with the gateway's feedback token, which is what lets
    learning profiles (exp3, exp4, cocktail) learn during a run. HTTP only.
    """

    share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of successfully answered requests whose true labels are posted "
        "(drawn at random, seeded by `seed`).",
    )
    token_env: str = Field(
        FEEDBACK_TOKEN_ENV,
        min_length=1,
        description="Environment variable holding the gateway's feedback token (a gateway "
        "the harness starts from target.config gets a random one when it is unset).",
    )


class Limits(Strict):
    """Bounds that keep a run finite whatever the shape says."""

    max_requests: int = Field(1_000_000, ge=1, le=MAX_REQUESTS, description="Hard request cap.")
    drain_timeout_s: float = Field(
        15.0, gt=0, le=600, description="Wait for in-flight answers after the last send."
    )
    max_send_lag_ms: float = Field(
        10.0, gt=0, description="p99 send lag above this flags the generator as saturated."
    )


class Scenario(Strict):
    """A load test: target, traffic, checks and faults."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Default: the file's stem."
    )
    description: str = Field("", description="Free text shown in the report.")
    target: Target
    protocol: Literal["http_json", "http_binary", "grpc"] = Field(
        "http_binary", description="OIP HTTP with JSON tensors or binary tensors, or OIP gRPC."
    )
    model: str = Field("digits", min_length=1, description="Model name to infer against.")
    request: RequestSpec = Field(default_factory=RequestSpec)
    load: Load
    mix: list[RequestClass] = Field(
        default_factory=lambda: [RequestClass(name="default")],
        min_length=1,
        description="Weighted request classes.",
    )
    slo: Slo = Field(default_factory=Slo)
    faults: list[FaultSpec] = Field(default_factory=list, description="Timed events.")
    generators: int = Field(1, ge=1, le=16, description="Generator processes, merged.")
    connections: int = Field(
        64, ge=1, le=4096, description="HTTP keep-alive connections per generator process."
    )
    seed: int = Field(0, description="Seed for arrivals and request choice.")
    feedback: FeedbackSpec | None = Field(
        None, description="Post true labels of answered requests to the feedback API."
    )
    limits: Limits = Field(default_factory=Limits)

    # Filled by load_scenario: where relative paths resolve from, and the report's name.
    base_dir: Path = Field(Path("."), exclude=True)

    @field_validator("feedback")
    @classmethod
    def _feedback_over_http(
        cls, value: FeedbackSpec | None, info: ValidationInfo
    ) -> FeedbackSpec | None:
        if value is None:
            return value
        protocol = info.data.get("protocol")
        if protocol == "grpc":
            raise ValueError(
                "feedback is not supported with protocol grpc: the gateway's feedback API is "
                "HTTP only (OIP has no gRPC feedback call); use http_binary or http_json"
            )
        request = info.data.get("request")
        if isinstance(request, RequestSpec) and request.endpoint != "infer":
            raise ValueError("feedback needs request.endpoint: infer (labels of answered samples)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        t = self.target
        if t.config is None:
            if self.protocol == "grpc" and not t.grpc:
                raise ValueError("protocol grpc needs target.grpc (HOST:PORT)")
            if self.protocol != "grpc" and not t.url:
                raise ValueError(f"protocol {self.protocol} needs target.url")
        if isinstance(self.load, ClosedLoad) and self.load.concurrency < self.generators:
            raise ValueError("load.concurrency must be at least `generators` (one client each)")
        names = [c.name for c in self.mix]
        if len(set(names)) != len(names):
            raise ValueError("mix class names must be unique")
        return self

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def display_name(self, source: Path) -> str:
        return self.name or source.stem


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError listing every problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ScenarioError([f"{where}: invalid YAML: {exc}"]) from None
    return parse_scenario(data, source=source, base_dir=path.parent, text=text)


def parse_scenario(
    data: Any, *, source: str = "<scenario>", base_dir: Path = Path("."), text: str | None = None
) -> Scenario:
    """Validate a decoded document; raises ScenarioError with located messages."""
    lines = line_index(text) if text is not None else {}
    if not isinstance(data, dict):
        raise ScenarioError([f"{source}: the document must be a mapping"])
    try:
        scenario = Scenario.model_validate({**data, "base_dir": base_dir.resolve()})
    except ValidationError as exc:
        raise ScenarioError(format_errors(source, _located(exc), lines)) from None
    errors = _fault_errors(scenario) + _file_errors(scenario)
    if errors:
        raise ScenarioError(format_errors(source, errors, lines))
    return scenario


def _located(exc: ValidationError) -> list[LocatedError]:
    out: list[LocatedError] = []
    for e in exc.errors():
        loc: Loc = tuple(e["loc"])
        # Tagged unions add the tag to the path (load.poisson.rps); the YAML has no such key.
        if len(loc) > 1 and loc[0] == "load" and loc[1] in SHAPES:
            loc = (loc[0], *loc[2:])
        if e["type"] == "extra_forbidden" and loc:
            msg = f"unknown key {loc[-1]!r}"
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown shape; expected one of {', '.join(SHAPES)}"
            loc = (*loc, "shape")
        else:
            msg = e["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def _known_keys(loc: Loc) -> list[str]:
    """Field names allowed beside ``loc[-1]``, for "did you mean" hints."""
    models: list[type[BaseModel]] = [Scenario]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = [m.model_fields[str(part)] for m in models if str(part) in m.model_fields]
        models = [inner for f in fields for inner in _models_in(f.annotation)]
    return sorted({k for m in models for k in m.model_fields if k != "base_dir"})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models inside ``X``, ``list[X]``, ``X | None`` or an annotated union of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _fault_errors(scenario: Scenario) -> list[LocatedError]:
    errors: list[LocatedError] = []
    for i, spec in enumerate(scenario.faults):
        loc: Loc = ("faults", i)
        try:
            faults.validate_params(spec.name, spec.params)
        except KeyError as exc:
            errors.append(((*loc, "name"), str(exc.args[0])))
            continue
        except ValidationError as exc:
            errors.extend(((*loc, "params", *e["loc"]), e["msg"]) for e in exc.errors())
            continue
        end = getattr(scenario.load, "duration_s", None)
        if end is not None and spec.at_s >= end:
            errors.append(((*loc, "at_s"), f"must be before the load ends ({end:g} s)"))
        if faults.needs_process(spec.name) and scenario.target.config is None:
            errors.append(
                ((*loc, "name"), f"{spec.name!r} needs a harness-started gateway (target.config)")
            )
    return errors


def _file_errors(scenario: Scenario) -> list[LocatedError]:
    errors: list[LocatedError] = []
    checks: list[tuple[Loc, Path | None]] = [
        (("target", "config"), scenario.target.config),
        (("request", "data"), scenario.request.data),
    ]
    if isinstance(scenario.load, TraceLoad):
        checks.append((("load", "path"), scenario.load.path))
    for loc, path in checks:
        if path is not None and not scenario.resolve(path).is_file():
            errors.append((loc, f"file not found: {scenario.resolve(path)}"))
    return errors
