"""The transport-agnostic data plane: validate -> select -> call -> aggregate, with metrics."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import numpy as np

from ensemble import __version__
from ensemble.errors import EnsembleError, InvalidInput, MemberFailed
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.base import Replica
from ensemble.replicas.member import Member
from ensemble.repository import VERSION, EnsembleModel, Repository, ServedModel
from ensemble.types import (
    InferRequest,
    InferResponse,
    MemberAnswer,
    Param,
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
        metrics.readiness = lambda: {n: repository.get(n).ready() for n in repository.names()}

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
        self.metrics.inflight += 1
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
            self.metrics.inflight -= 1
            self.metrics.record_request(
                label, protocol, outcome_of(error), time.perf_counter() - start
            )

    async def _member(
        self, member: Member, feed: dict[str, np.ndarray]
    ) -> tuple[list[Tensor], Parameters]:
        call = _Call(member, member.pick(), feed, None)
        try:
            result = await call.future
        finally:
            self._record(call)
        outputs = [
            Tensor(spec.name, spec.datatype, tuple(result[spec.name].shape), result[spec.name])
            for spec in member.outputs
        ]
        return outputs, {"members_answered": f"{member.name}@{call.replica.tier}"}

    def _record(self, call: _Call) -> None:
        future = call.future
        ok = future.done() and not future.cancelled() and future.exception() is None
        self.metrics.record_member_call(
            call.member.name, call.replica.tier, "success" if ok else "error", call.latency_s()
        )

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
        calls = []
        for name in chosen:
            member = model.members[name]
            calls.append(
                _Call(member, member.pick(), model.member_feed(member, feed), member.score_outputs)
            )
        try:
            await asyncio.wait([c.future for c in calls])
        except asyncio.CancelledError:
            for call in calls:
                call.future.cancel()  # a queued in-process call is then skipped
            raise
        answers: list[MemberAnswer] = []
        failures: list[BaseException] = []
        for call in calls:
            self._record(call)
            try:
                scores = call.member.scores(call.future.result())
            except Exception as exc:
                failures.append(exc)
                continue
            answers.append(
                MemberAnswer(
                    call.member.name, call.replica.tier, call.replica.name, scores, call.latency_s()
                )
            )
        self.metrics.record_completeness(model.name, len(chosen), len(answers))
        if not answers:
            invalid = [f for f in failures if isinstance(f, InvalidInput)]
            if len(invalid) == len(failures):
                reasons = "; ".join(str(f) for f in invalid)
                raise InvalidInput(f"no member could answer this input: {reasons}")
            reasons = "; ".join(
                f"{c.member.name}: {f}" for c, f in zip(calls, failures, strict=True)
            )
            raise MemberFailed(f"all {len(chosen)} members failed: {reasons}")
        agg = model.aggregation.aggregate(answers, len(model.classes))
        labels = model.labels[agg.class_index]
        probs = np.ascontiguousarray(agg.probabilities, dtype=np.float32)
        outputs = [
            Tensor("label", model.metadata.outputs[0].datatype, (batch,), labels),
            Tensor("probabilities", "FP32", tuple(probs.shape), probs),
        ]
        params = dict(_describe(model.profile, chosen, tuple((a.member, a.tier) for a in answers)))
        params["confidence"] = round(float(agg.confidence.min()), 6)
        return outputs, params


@functools.lru_cache(maxsize=1024)
def _describe(
    profile: str, chosen: tuple[str, ...], answered: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, Param], ...]:
    """The response parameters that depend only on who was asked and who answered (cached:
    the same few combinations repeat on every request)."""
    return (
        ("policy", profile),
        ("members_asked", ",".join(chosen)),
        ("members_answered", ",".join(f"{m}@{t}" for m, t in answered)),
        ("completeness", round(len(answered) / len(chosen), 6)),
    )


class _Call:
    """One call to a member replica in flight, timed from start to completion."""

    __slots__ = ("end", "future", "member", "replica", "start")

    def __init__(
        self,
        member: Member,
        replica: Replica,
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
    ) -> None:
        self.member = member
        self.replica = replica
        self.start = time.perf_counter()
        self.end = 0.0
        self.future: asyncio.Future[dict[str, np.ndarray]] = asyncio.ensure_future(
            replica.infer(feed, outputs)
        )
        self.future.add_done_callback(self._stamp)

    def _stamp(self, _: object) -> None:
        self.end = time.perf_counter()

    def latency_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start
