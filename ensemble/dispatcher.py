"""The transport-agnostic data plane: validate -> select -> call -> aggregate, with metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from ensemble import __version__
from ensemble.errors import EnsembleError, InvalidInput, MemberFailed
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import Member
from ensemble.repository import VERSION, EnsembleModel, Repository, ServedModel
from ensemble.types import (
    InferRequest,
    InferResponse,
    MemberAnswer,
    Parameters,
    SelectionContext,
    Tensor,
)
from ensemble.validation import check_inputs, check_outputs

SERVER_NAME = "ensemble-gateway"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration", "model_repository")


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label for a finished request."""
    if exc is None:
        return "success"
    status = exc.http_status if isinstance(exc, EnsembleError) else 500
    if status == 503:
        return "unavailable"
    return "client_error" if 400 <= status < 500 else "server_error"


class Dispatcher:
    """Serves inference for both frontends; knows nothing about HTTP or gRPC."""

    def __init__(
        self, repository: Repository, metrics: GatewayMetrics, *, max_batch_size: int = 1024
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.draining = False
        for name in repository.names():
            metrics.model_ready.labels(name).set(1 if repository.get(name).ready() else 0)

    # -- health and metadata ------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        return self.repository.get(name, version)

    # -- inference ----------------------------------------------------------------------

    async def infer(self, request: InferRequest, protocol: str) -> InferResponse:
        """Answer one request; raises EnsembleError subclasses for every client-visible failure."""
        start = time.perf_counter()
        label = ""  # unknown model names never become label values (unbounded cardinality)
        error: BaseException | None = None
        self.metrics.inflight.inc()
        try:
            model = self.repository.get(request.model_name, request.model_version)
            label = model.name
            feed = check_inputs(model.metadata, request.inputs, self.max_batch_size)
            check_outputs(model.metadata, request.outputs)
            if isinstance(model, EnsembleModel):
                outputs, params = await self._ensemble(model, feed)
            else:
                outputs, params = await self._member(model, feed)
            if request.outputs is not None:
                wanted = [o.name for o in request.outputs]
                by_name = {t.name: t for t in outputs}
                outputs = [by_name[n] for n in wanted]
            return InferResponse(model.name, VERSION, outputs, request.id, params)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(label, protocol, outcome_of(error)).inc()
            if label:
                self.metrics.request_latency.labels(label, protocol).observe(
                    time.perf_counter() - start
                )

    async def _member(
        self, member: Member, feed: dict[str, np.ndarray]
    ) -> tuple[list[Tensor], Parameters]:
        replica = member.pick()
        start = time.perf_counter()
        outcome = "error"
        try:
            result = await replica.infer(feed)
            outcome = "success"
        finally:
            self._observe_call(member.name, replica.tier, start, outcome)
        outputs = [
            Tensor(spec.name, spec.datatype, tuple(result[spec.name].shape), result[spec.name])
            for spec in member.outputs
        ]
        return outputs, {"members_answered": f"{member.name}@{replica.tier}"}

    def _observe_call(self, member: str, tier: str, start: float, outcome: str) -> None:
        self.metrics.member_latency.labels(member, tier).observe(time.perf_counter() - start)
        self.metrics.member_calls.labels(member, tier, outcome).inc()

    async def _ask(
        self, model: EnsembleModel, member: Member, feed: dict[str, np.ndarray]
    ) -> MemberAnswer:
        replica = member.pick()
        start = time.perf_counter()
        outcome = "error"
        try:
            answer = await member.answer(model.member_feed(member, feed), replica)
            outcome = "success"
        finally:
            self._observe_call(member.name, replica.tier, start, outcome)
        return answer

    async def _ensemble(
        self, model: EnsembleModel, feed: dict[str, np.ndarray]
    ) -> tuple[list[Tensor], Parameters]:
        batch = next(iter(feed.values())).shape[0]
        views = tuple(m.view() for m in model.members.values())
        chosen = model.selection.select(SelectionContext(model.name, views, batch))
        unknown = [n for n in chosen if n not in model.members]
        if not chosen or unknown:
            raise EnsembleError(
                f"selection policy returned {list(chosen)!r} for ensemble {model.name!r}"
            )
        results = await asyncio.gather(
            *(self._ask(model, model.members[n], feed) for n in chosen), return_exceptions=True
        )
        answers = [r for r in results if isinstance(r, MemberAnswer)]
        failures = [r for r in results if isinstance(r, BaseException)]
        self.metrics.members_asked.labels(model.name).inc(len(chosen))
        self.metrics.members_answered.labels(model.name).inc(len(answers))
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure  # cancellation and interpreter exits are not member failures
        if not answers:
            invalid = [f for f in failures if isinstance(f, InvalidInput)]
            if len(invalid) == len(failures):
                reasons = "; ".join(str(f) for f in invalid)
                raise InvalidInput(f"no member could answer this input: {reasons}")
            reasons = "; ".join(f"{n}: {f}" for n, f in zip(chosen, results, strict=True))
            raise MemberFailed(f"all {len(chosen)} members failed: {reasons}")
        agg = model.aggregation.aggregate(answers, len(model.classes))
        labels = model.labels[agg.class_index]
        probs = np.ascontiguousarray(agg.probabilities, dtype=np.float32)
        outputs = [
            Tensor("label", model.metadata.outputs[0].datatype, (batch,), labels),
            Tensor("probabilities", "FP32", tuple(probs.shape), probs),
        ]
        params: Parameters = {
            "policy": model.profile,
            "members_asked": ",".join(chosen),
            "members_answered": ",".join(f"{a.member}@{a.tier}" for a in answers),
            "completeness": round(len(answers) / len(chosen), 6),
            "confidence": round(float(agg.confidence.min()), 6),
        }
        return outputs, params
