"""The transport-agnostic data plane: validate -> select -> call -> aggregate, with metrics."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from typing import Any

import numpy as np

from ensemble import __version__
from ensemble.calls import Call, HedgedCall
from ensemble.contract import parse_contract
from ensemble.errors import DeadlineExceeded, EnsembleError, InvalidInput, MemberFailed
from ensemble.feedback import DEFAULT_ACCURACY_WINDOW, DEFAULT_WINDOW, FeedbackHub
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import Member
from ensemble.repository import VERSION, EnsembleModel, Profile, Repository, ServedModel
from ensemble.types import (
    AggregationContext,
    Contract,
    InferRequest,
    InferResponse,
    MemberAnswer,
    Param,
    Parameters,
    RoutingContext,
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
        self,
        repository: Repository,
        metrics: GatewayMetrics,
        *,
        max_batch_size: int = 1024,
        feedback_window: int = DEFAULT_WINDOW,
        feedback_accuracy_window: int = DEFAULT_ACCURACY_WINDOW,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.feedback = FeedbackHub(
            metrics,
            lambda: self.repository,  # read at each use: a reload swaps the repository
            window=feedback_window,
            accuracy_window=feedback_accuracy_window,
        )
        self.draining = False
        self._rng = random.Random(0)  # routing draws (p2c); seeded for repeatable runs
        metrics.readiness = self._readiness

    # -- health and metadata ------------------------------------------------------------

    def _readiness(self) -> dict[str, bool]:
        repository = self.repository  # read once: a reload may swap it
        return {n: repository.get(n).ready() for n in repository.names()}

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
            contract = parse_contract(
                request.parameters,
                tiers=self.repository.tiers,
                profiles=self.repository.profile_names,
            )
            deadline = start + contract.timeout_us / 1e6 if contract.timeout_us else None
            if isinstance(model, EnsembleModel):
                outputs, params = await self._ensemble(model, feed, contract, deadline, request.id)
            else:
                outputs, params = await self._member(model, feed, contract, deadline)
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
        self,
        member: Member,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
    ) -> tuple[list[Tensor], Parameters]:
        if contract.tier is not None and contract.tier not in member.tiers:
            raise InvalidInput(
                f"member {member.name!r} runs on {', '.join(member.tiers)}, "
                f"not on tier {contract.tier!r}"
            )
        call = Call(member, member.pick(ctx=RoutingContext(member.name, contract.tier)), feed, None)
        outcome: str | None = None
        try:
            await _wait([call], deadline)
            if not call.future.done():
                call.future.cancel()
                outcome = "timeout"
                raise DeadlineExceeded(f"member {member.name!r} did not answer in time")
            result = call.future.result()
        finally:
            self._record(call, outcome)
        outputs = [
            Tensor(spec.name, spec.datatype, tuple(result[spec.name].shape), result[spec.name])
            for spec in member.outputs
        ]
        return outputs, {"members_answered": f"{member.name}@{call.replica.tier}"}

    def _start(
        self,
        model: EnsembleModel,
        member: Member,
        feed: dict[str, np.ndarray],
        profile: Profile,
        contract: Contract,
        rng: random.Random,
    ) -> Call:
        """Start one member's call: route it, and hedge it when the profile says so."""
        member_feed = model.member_feed(member, feed)
        if len(member.replicas) == 1:  # nothing to route, nothing to hedge: the cheap path
            return Call(member, member.pick(), member_feed, member.score_outputs)
        ctx = RoutingContext(member.name, contract.tier, model.tiers)
        order = member.route(profile.routing, ctx, rng)
        profile.hedge_state = profile.hedging.on_primary(profile.hedge_state)
        delay = profile.hedging.delay_s(member.replica_view(order[0])) if len(order) > 1 else None
        if delay is None:
            return Call(member, order[0], member_feed, member.score_outputs)
        return HedgedCall(
            member,
            order[0],
            member_feed,
            member.score_outputs,
            backup=order[1],
            delay_s=delay,
            may_hedge=profile.may_hedge,
        )

    def _record(self, call: Call, outcome: str | None = None) -> None:
        if outcome is None:
            future = call.future
            ok = future.done() and not future.cancelled() and future.exception() is None
            outcome = "success" if ok else "error"
        self.metrics.record_member_call(
            call.member.name, call.replica.tier, outcome, call.latency_s()
        )
        if call.hedged:
            self.metrics.record_hedge(
                call.member.name, isinstance(call, HedgedCall) and call.won_by_hedge
            )

    async def _ensemble(
        self,
        model: EnsembleModel,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
        request_id: str | None = None,
    ) -> tuple[list[Tensor], Parameters]:
        profile = model.profiles[contract.policy or model.profile]
        rng = self._rng
        batch = next(iter(feed.values())).shape[0]
        views = tuple(m.view() for m in model.members.values())
        asked: list[str] = []
        answers: list[MemberAnswer] = []
        failures: list[tuple[str, BaseException]] = []
        late = False
        hedges = 0
        # Selection may go in stages (a cascade escalates while unsure); each stage's calls
        # run concurrently, and everything shares the request's one deadline.
        while not late:
            remaining = None if deadline is None else deadline - time.perf_counter()
            ctx = SelectionContext(
                model.name, views, batch, contract, remaining, model.validation, tuple(asked)
            )
            chosen, profile.state = profile.selection.select(ctx, tuple(answers), profile.state)
            chosen = tuple(
                n for n in dict.fromkeys(chosen) if n in model.members and n not in asked
            )
            if not chosen:
                break
            asked.extend(chosen)
            calls = [
                self._start(model, model.members[n], feed, profile, contract, rng) for n in chosen
            ]
            await _wait(calls, deadline)
            hedges += sum(call.hedged for call in calls)
            for call in calls:
                if not call.future.done():
                    late = True  # at the deadline: answer with what arrived
                    call.future.cancel()
                    self._record(call, "timeout")
                    failures.append((call.member.name, DeadlineExceeded("no answer in time")))
                    continue
                self._record(call)
                try:
                    scores = call.member.scores(call.future.result())
                except Exception as exc:
                    failures.append((call.member.name, exc))
                    continue
                answers.append(
                    MemberAnswer(
                        call.member.name,
                        call.replica.tier,
                        call.replica.name,
                        scores,
                        call.latency_s(),
                    )
                )
        self.metrics.record_completeness(model.name, len(asked), len(answers))
        if not asked:
            where = f" on tier {contract.tier!r}" if contract.tier else ""
            raise InvalidInput(f"no member of ensemble {model.name!r} can answer{where}")
        if not answers:
            raise _no_answer(failures, late)
        members = {v.name: v for v in views}
        agg = profile.aggregation.aggregate(
            answers, AggregationContext(len(model.classes), members, profile.weights())
        )
        labels = model.labels[agg.class_index]
        probs = np.ascontiguousarray(agg.probabilities, dtype=np.float32)
        outputs = [
            Tensor("label", model.metadata.outputs[0].datatype, (batch,), labels),
            Tensor("probabilities", "FP32", tuple(probs.shape), probs),
        ]
        params = dict(
            _describe(profile.name, tuple(asked), tuple((a.member, a.tier) for a in answers))
        )
        params["confidence"] = round(float(agg.confidence.min()), 6)
        if deadline is not None:
            params["deadline_met"] = not late
        if hedges:
            params["hedges"] = hedges
        if request_id:  # only requests with an id can be joined to a label later
            self.feedback.remember(model.name, request_id, profile.name, tuple(asked), answers)
        return outputs, params


def _no_answer(failures: list[tuple[str, BaseException]], late: bool) -> EnsembleError:
    """The error for a request no member answered: the client's fault, time, or members'."""
    if late and all(isinstance(f, DeadlineExceeded) for _, f in failures):
        return DeadlineExceeded("no member answered before the request's timeout")
    if all(isinstance(f, InvalidInput) for _, f in failures):
        return InvalidInput(
            "no member could answer this input: " + "; ".join(str(f) for _, f in failures)
        )
    reasons = "; ".join(f"{name}: {f}" for name, f in failures)
    return MemberFailed(f"all {len(failures)} members asked failed: {reasons}")


async def _wait(calls: list[Call], deadline: float | None) -> None:
    """Wait for the calls until the deadline; cancel them if the request itself is cancelled."""
    timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
    try:
        await asyncio.wait([c.future for c in calls], timeout=timeout)
    except asyncio.CancelledError:
        for call in calls:
            call.future.cancel()  # a queued in-process call is then skipped
        raise


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
