"""Value types shared by frontends, the dispatcher and policies (a leaf module: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

Param: TypeAlias = bool | int | float | str
"""An OIP parameter value: the protocol allows booleans, integers, floats and strings."""

Parameters: TypeAlias = dict[str, Param]

ClassLabel: TypeAlias = int | str
"""A classifier's class label, as its model names it."""

MODEL_VERSION = "1"
"""The version of an ensemble, and of a member's model unless its config names others."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as metadata describes it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class Tensor:
    """A named tensor; ``data`` is a numpy array already shaped as ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` is the HTTP binary-data preference."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    """One inference request, whichever protocol carried it."""

    model_name: str
    model_version: str | None
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: Parameters = field(default_factory=dict)
    transport_deadline_s: float | None = None
    """Seconds left before the transport's own deadline when the request arrived (a gRPC
    call's deadline); None without one."""


@dataclass(slots=True)
class InferResponse:
    """One inference response; ``parameters`` say how the answer was produced."""

    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ``GET /v2/models/{name}`` reports."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, Param] = field(default_factory=dict)


DEFAULT_PRIORITY = 0
"""A request's priority when it sets none: the most important."""


@dataclass(slots=True)
class Contract:
    """What one request asks for; every field is optional (None: no constraint)."""

    timeout_us: int | None = None
    """Deadline in microseconds from arrival (Triton's `timeout` parameter)."""
    priority: int = DEFAULT_PRIORITY
    """Lower is more important (Triton's convention)."""
    min_accuracy: float | None = None
    max_cost: float | None = None
    tier: str | None = None
    """Where data may go: a tier name; None means any tier."""
    policy: str | None = None
    """An operator-defined policy profile to use instead of the ensemble's own."""
    split: str | None = None
    """Where a split member runs this request (`edge`, `cloud` or a cut tensor) instead of
    where its split policy would."""


@dataclass(frozen=True, slots=True)
class SplitOption:
    """One way to run a split member's call: all on the head tier (``edge``), all on the
    tail tier (``cloud``), or cut at a tensor (its name): the head on the head tier, the
    tensor across the link, the tail on the tail tier. Times are for this call's rows."""

    name: str
    head_s: float
    """Expected compute on the head tier (0 when it runs nothing there)."""
    tail_s: float
    """Expected compute on the tail tier (0 when it runs nothing there)."""
    sent_bytes: int
    """Bytes that cross to the tail tier (0 for ``edge``)."""
    returned_bytes: int
    """Bytes that come back (0 for ``edge``)."""
    ready: bool = True
    overhead_s: float = 0.0
    """What its recent calls took beyond their compute and link time (hand-offs between
    threads and tiers, queueing), measured; 0 before any."""


@dataclass(frozen=True, slots=True)
class SplitContext:
    """What a split policy sees for one call: the options and the link to the tail tier now."""

    member: str
    rows: int
    options: tuple[SplitOption, ...]
    delay_s: float
    """One-way delay to the tail tier now (0 without an emulated link)."""
    bandwidth_bytes_per_s: float | None
    """None: the link does not limit bandwidth."""


@dataclass(frozen=True, slots=True)
class PlacementView:
    """One member on one tier as it is now: what a call there is expected to take and cost.

    Latencies are the tier's round trip now plus the service time (call latency less the round
    trip at the time) of its recent calls, queueing included; with fewer than 8 calls in the
    estimate's horizon the service time is the member card's (``samples`` is then 0)."""

    tier: str
    ready: bool
    """Some replica on the tier takes calls now."""
    latency_s: float | None
    """Expected (median) latency of a call; None with neither calls nor a card."""
    latency_p95_s: float | None
    latency_p99_s: float | None
    round_trip_s: float
    """The network's share: the tier's health checks' round trip (or its emulated link's)."""
    error_rate: float = 0.0
    """Share of recent calls that failed (decaying: old failures weigh less)."""
    cost_per_call: float = 0.0
    samples: int = 0
    """Recent calls the latencies come from; 0: seeded from the card."""

    def tail_s(self, quantile: str) -> float | None:
        """``p50``, ``p95`` or ``p99`` latency."""
        if quantile == "p50":
            return self.latency_s
        return self.latency_p95_s if quantile == "p95" else self.latency_p99_s


@dataclass(frozen=True, slots=True)
class Pick:
    """A selection policy's choice of a member on a given tier (a plain member name lets
    routing choose among all the tiers the request may use)."""

    member: str
    tier: str


@dataclass(frozen=True, slots=True)
class MemberView:
    """What selection and aggregation policies know about one ensemble member."""

    name: str
    tiers: tuple[str, ...]
    accuracy: float | None
    """Validation accuracy from the member card; None without a card."""
    ready: bool
    per_class_accuracy: tuple[float, ...] | None = None
    """Validation recall per class index, from the card."""
    cost_per_call: float = 0.0
    """Expected price of one call on its first tier, in the config's currency."""
    latency_s: float | None = None
    """The member card's batch-1 p50 (offline, on the machine that profiled it; no network):
    ``placements`` has the live figures."""
    latency_p95_s: float | None = None
    """The member card's batch-1 p99 (offline)."""
    rolling_accuracy: float | None = None
    """Accuracy over recent feedback (true labels joined to answers); None before any."""
    placements: tuple[PlacementView, ...] = ()
    """Each tier it runs on, live (empty for a view built without replicas, as in tests)."""


@dataclass(frozen=True, slots=True)
class ValidationSet:
    """Held-out labels and each member's answers on them: exact accuracy of any subset."""

    labels: np.ndarray
    """Shape [n], class indices."""
    probabilities: Mapping[str, np.ndarray]
    """Member name -> shape [n, n_classes]."""


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """Input of a selection policy for one request."""

    ensemble: str
    members: tuple[MemberView, ...]
    batch_size: int
    contract: Contract = field(default_factory=Contract)
    remaining_s: float | None = None
    """Time left before the request's deadline; None when it has none."""
    validation: ValidationSet | None = None
    asked: tuple[str, ...] = ()
    """Members already asked for this request, answered or failed (never ask them again)."""


@dataclass(frozen=True, slots=True)
class AggregationContext:
    """What an aggregation policy may use besides the answers."""

    n_classes: int
    members: Mapping[str, MemberView] = field(default_factory=dict)
    weights: Mapping[str, float] | None = None
    """Member weights the selection policy learned (e.g. Exp4's), when it has any."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """True labels joined (by the feedback id the gateway issued) to what members answered.

    The gateway keeps each member's predicted class per row, not its probabilities: Clipper's
    0/1 loss, Cocktail's per-class votes and the rolling accuracy all compare top classes.
    """

    ensemble: str
    feedback_id: str
    labels: np.ndarray
    """Shape [batch], true class indices."""
    predicted: Mapping[str, np.ndarray]
    """Member name -> its predicted class index per row (shape [batch], an integer type): the
    argmax of the probabilities it returned for the request."""
    asked: tuple[str, ...]
    n_classes: int
    """Width of the members' probabilities (the ensemble's classes)."""
    versions: Mapping[str, str] = field(default_factory=dict)
    """Member name -> the version that answered, for members serving several."""

    @classmethod
    def from_probabilities(
        cls,
        ensemble: str,
        feedback_id: str,
        labels: np.ndarray,
        probabilities: Mapping[str, np.ndarray],
        asked: tuple[str, ...],
    ) -> Feedback:
        """The event for members' full probabilities [batch, n_classes] (tests, tools)."""
        predicted = {m: np.asarray(p).argmax(axis=1) for m, p in probabilities.items()}
        n_classes = max((int(np.shape(p)[1]) for p in probabilities.values()), default=0)
        return cls(ensemble, feedback_id, labels, predicted, asked, n_classes)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What a routing policy knows about one replica of a member."""

    name: str
    tier: str
    ready: bool
    outstanding: int = 0
    """Calls sent and not yet answered."""
    latency_ewma_s: float | None = None
    latency_p95_s: float | None = None
    ejected: bool = False
    """Taken out by outlier detection (circuit open)."""
    latency_age_s: float | None = None
    """Seconds since a latency last went into the EWMA (None: never, or not known)."""


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """Input of a routing policy for one call."""

    member: str
    tier: str | None = None
    """The contract's tier restriction; None means any tier."""
    tier_order: tuple[str, ...] = ("edge", "cloud")
    """Tiers from nearest to farthest, for tier-preferring policies."""


@dataclass(frozen=True, slots=True)
class MemberAnswer:
    """Class probabilities one member returned for a whole request batch."""

    member: str
    tier: str
    replica: str
    probabilities: np.ndarray
    """Shape [batch, n_classes], rows are probability distributions."""
    latency_s: float
    version: str | None = None
    """The member's version that answered, when it serves several."""


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The ensemble's combined answer for a request batch."""

    probabilities: np.ndarray
    """Shape [batch, n_classes]."""
    class_index: np.ndarray
    """Shape [batch], the index of the winning class per row."""
    confidence: np.ndarray
    """Shape [batch], in [0, 1]: the policy's own measure of agreement or certainty."""
