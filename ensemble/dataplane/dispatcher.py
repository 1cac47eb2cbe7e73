"""The transport-agnostic entry of the data plane: one request, from admission to answer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from ensemble import __version__, tracing
from ensemble.clock import SYSTEM_CLOCK, Clock
from ensemble.cluster.slots import Slots
from ensemble.dataplane import readings, respond
from ensemble.dataplane.admission import AdmissionGate
from ensemble.dataplane.contract import bound_by_transport, parse_contract
from ensemble.dataplane.ensemble_run import EnsembleRun
from ensemble.dataplane.fanout import mirror, record_call, start_call, version_for, wait_calls
from ensemble.dataplane.feedback import DEFAULT_ACCURACY_WINDOW, FeedbackHub
from ensemble.dataplane.feedback_store import DEFAULT_MAX_BYTES, DEFAULT_WINDOW
from ensemble.dataplane.uncertainty import Doubt, assess
from ensemble.dataplane.validation import check_inputs, check_outputs
from ensemble.dataplane.verdict import Alerts, no_answer, rejection
from ensemble.errors import DeadlineExceeded, EnsembleError, InvalidInput, ModelNotFound, clip
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import Member
from ensemble.replicas.versions import Decision
from ensemble.repository import VERSION, EnsembleModel, Profile, Repository, ServedModel
from ensemble.scope import request_scope
from ensemble.types import (
    DEFAULT_PRIORITY,
    Aggregate,
    AggregationContext,
    Contract,
    InferRequest,
    InferResponse,
    Parameters,
    RoutingContext,
    Tensor,
)

SERVER_NAME = "ensemble-gateway"
TRACED_PARAMETERS = (
    "policy",
    "members_asked",
    "members_answered",
    "versions",
    "degraded",
    "violations",
    "unreachable",
    "hedges",
    "retries",
    "deadline_met",
    "cost",
    "stages",
    "fallback",
)
"""Response parameters a request's span repeats (how its answer was made)."""
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration", "model_repository")


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label for a finished request: a request its caller cancelled (a gRPC
    client that cancelled or went away) is the client's doing, as an HTTP 499 is."""
    if exc is None:
        return "success"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    status = exc.http_status if isinstance(exc, EnsembleError) else 500
    if status == 503:
        return "unavailable"
    return "client_error" if 400 <= status < 500 else "server_error"


class Dispatcher:
    """Serves inference for both frontends; knows nothing about HTTP or gRPC.

    ``repository`` is what requests use; a hot reload replaces it whole, and each request reads
    it once, so it runs on one config from start to end."""

    def __init__(
        self,
        repository: Repository,
        metrics: GatewayMetrics,
        *,
        max_batch_size: int = 1024,
        allow_non_finite: bool = False,
        feedback: bool = False,
        feedback_window: int = DEFAULT_WINDOW,
        feedback_max_bytes: int = DEFAULT_MAX_BYTES,
        feedback_accuracy_window: int = DEFAULT_ACCURACY_WINDOW,
        clock: Clock = SYSTEM_CLOCK,
        slots: Slots | None = None,
    ) -> None:
        self.share_decision: Callable[[Decision], None] | None = None
        """Where a rollout decision goes (None: applied in this process; a worker sends it
        through the hub, which has every worker apply it)."""
        self.repository = repository
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.allow_non_finite = allow_non_finite
        """Floating-point inputs may hold NaN and infinity (``server.non_finite_inputs``)."""
        self.clock = clock
        self.feedback = FeedbackHub(
            metrics,
            lambda: self.repository,  # read at each use: a reload swaps the repository
            enabled=feedback,
            window=feedback_window,
            max_bytes=feedback_max_bytes,
            accuracy_window=feedback_accuracy_window,
        )
        self.draining = False
        self.gate = AdmissionGate(metrics, clock, slots)
        """Admission control; its policy comes from the repository, so reloads change it."""
        self.alerts = Alerts(clock)
        self._rng = random.Random(0)  # routing draws (p2c); seeded for repeatable runs
        # Read at scrape time, from the repository serving then.
        metrics.readiness = lambda: readings.readiness(self.repository)
        metrics.replicas = lambda: readings.replica_states(self.repository)
        metrics.placements = lambda: readings.placements(self.repository)
        metrics.drift = lambda: readings.drift(self.repository)
        metrics.versions = lambda: readings.versions(self.repository)
        metrics.splits = lambda: readings.splits(self.repository)

    @property
    def repository(self) -> Repository:
        """What serves; a reload swaps it whole."""
        return self._repository

    @repository.setter
    def repository(self, repository: Repository) -> None:
        self._repository = repository
        repository.publish = self._decided

    def _decided(self, decision: Decision) -> None:
        share = self.share_decision
        if share is None:
            self._repository.apply_decision(decision)
        else:
            share(decision)

    def decide_rollout(self, member: str, action: str) -> Decision:
        """Promote or roll back ``member``'s running rollout now (the admin API); as a
        decision on evidence would, on every worker."""
        several = self._repository.versions.get(member)
        rollout = several.rollout if several is not None else None
        if rollout is None:
            raise ModelNotFound(f"member {clip(member)!r} has no rollout")
        if rollout.phase != "running":
            raise InvalidInput(
                f"member {member!r}: the rollout of version {rollout.candidate} is over "
                f"({rollout.phase.replace('_', ' ')})"
            )
        verdict: Literal["promote", "rollback"] = "promote" if action == "promote" else "rollback"
        decision = Decision(member, rollout.candidate, verdict, "by the admin API")
        self._decided(decision)
        return decision

    # -- health and metadata ------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        return self.repository.get(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model serves now: False for one the repository holds unloaded (as
        Triton answers), ModelNotFound for a name or version it does not know."""
        try:
            return self.repository.get(name, version).ready()
        except ModelNotFound:
            if self.repository.holds_unloaded(name, version):
                return False
            raise

    # -- inference ----------------------------------------------------------------------

    def shed_early(self, name: str, version: str | None) -> None:
        """Raise Overloaded when admission would shed a default-priority request for model
        ``name`` now. Frontends call it before decoding a request that sets no ``priority``, so
        a shed request costs no decoding, validation or contract parsing (under 2x overload
        half the requests are shed, and that work would come out of the other half's CPU).
        Anything else (an unknown model, a gate with room) is left to ``infer``. The frontend
        counts the request (``refused``)."""
        repository = self.repository
        error = self.gate.sheds(repository.admission, DEFAULT_PRIORITY)
        if error is None:
            return
        try:
            repository.get(name, version)
        except EnsembleError:
            return  # infer reports it
        self.gate.count_shed("full")
        raise error

    def refused(
        self, name: str, version: str | None, protocol: str, error: EnsembleError, started: float
    ) -> None:
        """Count a request a frontend refused before ``infer`` (its body, its decoding, an early
        shed) among the requests of its model, or of model "" when the name is unknown."""
        try:
            label = self.repository.get(name, version).name
        except EnsembleError:
            label = ""
        elapsed = self.clock.now() - started
        self.metrics.record_request(label, protocol, outcome_of(error), elapsed)

    async def infer(self, request: InferRequest, protocol: str) -> InferResponse:
        """Answer one request; raises EnsembleError subclasses for every client-visible failure."""
        start = self.clock.now()
        label = ""  # unknown model names never become label values (unbounded cardinality)
        error: BaseException | None = None
        self.metrics.inflight += 1
        repository = self.repository  # the request's snapshot: a reload swaps it whole
        try:
            model = repository.get(request.model_name, request.model_version)
            label = model.name
            shadow = None
            feed = check_inputs(
                model.metadata, request.inputs, self.max_batch_size, self.allow_non_finite
            )
            check_outputs(model.metadata, request.outputs)
            contract = parse_contract(
                request.parameters, tiers=repository.tiers, profiles=repository.profile_names
            )
            bound_by_transport(contract, request.transport_deadline_s)
            deadline = start + contract.timeout_us / 1e6 if contract.timeout_us else None
            # Replica clients send the time left and the priority on (`ensemble.scope`).
            with request_scope(deadline, contract.priority, self.clock):
                async with self.gate.slot(repository.admission, contract.priority, deadline):
                    version = VERSION
                    if isinstance(model, EnsembleModel):
                        outputs, params = await self._ensemble(model, feed, contract, deadline)
                    else:
                        if not request.model_version:  # its serving version, or a canary
                            model, shadow = version_for(model, self._rng)
                        outputs, params = await self._member(
                            repository, model, shadow, feed, contract, deadline
                        )
                        version = model.version
            outputs = respond.requested(request, outputs)
            if tracing.enabled():
                tracing.annotate(_traced(model.name, version, params))
            return InferResponse(model.name, version, outputs, request.id, params)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.metrics.inflight -= 1
            elapsed = self.clock.now() - start
            self.metrics.record_request(label, protocol, outcome_of(error), elapsed)

    async def _member(
        self,
        repository: Repository,
        member: Member,
        shadow: Member | None,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
    ) -> tuple[list[Tensor], Parameters]:
        """A member addressed as a model of its own: one call, default routing and retries
        (and a mirrored copy to a ``shadow`` version)."""
        if contract.tier is not None and contract.tier not in member.tiers:
            raise InvalidInput(
                f"member {member.name!r} runs on {', '.join(member.tiers)}, "
                f"not on tier {contract.tier!r}"
            )
        call = start_call(
            member,
            feed,
            None,
            repository.direct,
            contract,
            deadline,
            repository.tiers,
            self._rng,
            self.clock,
        )
        if shadow is not None:
            routing = RoutingContext(member.name, contract.tier, repository.tiers)
            mirror(
                call,
                shadow,
                feed,
                None,
                routing,
                repository.direct,
                self._rng,
                lambda copy: record_call(self.metrics, member.name, copy),
            )
        outcome: str | None = None
        try:
            await wait_calls([call], deadline, self.clock)
            if not call.future.done():
                call.future.cancel()
                outcome = "timeout"
                raise DeadlineExceeded(f"member {member.name!r} did not answer in time")
            result = call.future.result()
        finally:
            record_call(self.metrics, member.name, call, outcome)
        return respond.member_outputs(member, result), {
            "members_answered": f"{member.name}@{call.replica.tier}",
            "cost": round(call.cost, 9),
        }

    async def _ensemble(
        self,
        model: EnsembleModel,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
    ) -> tuple[list[Tensor], Parameters]:
        """Select and ask members, check the contract, combine the answers."""
        profile = model.profiles[contract.policy or model.profile]
        run = EnsembleRun(
            model,
            profile,
            feed,
            contract,
            deadline,
            metrics=self.metrics,
            rng=self._rng,
            clock=self.clock,
        )
        await run.select()
        if not run.asked:
            where = f" on tier {contract.tier!r}" if contract.tier else ""
            raise InvalidInput(f"no member of ensemble {model.name!r} can answer{where}")
        rows = feed[model.metadata.inputs[0].name] if model.watch is not None else None
        doubt, escalated = await self._doubt(model, profile, run, rows)
        kinds = run.violations()
        action = profile.on_violation
        rerouted = False
        if kinds and action == "reroute" and not run.late:
            rerouted = await run.reroute()
            kinds = run.violations()
        if not run.answers and action in ("degrade", "reroute"):
            await run.fall_back()
        self.metrics.record_completeness(model.name, len(run.asked), len(run.answers), run.stages)
        if kinds:
            self.metrics.record_violations(model.name, kinds, action)
            if action == "reject":
                raise rejection(kinds, run.detail(kinds))
            if action == "alert":
                self.alerts.warn(model.name, run.detail(kinds))
        if not run.answers:
            raise no_answer(run.failures, run.late)
        agg = _aggregate(model, profile, run)
        params = respond.ensemble_parameters(run, agg, kinds, rerouted=rerouted)
        if doubt is not None:
            params.update(doubt.parameters(escalated))
        if rows is not None and model.watch is not None:
            model.watch.observe(rows)
        if respond.degraded(run, kinds):
            self.metrics.record_degraded(model.name)
        if self.feedback.enabled:  # the id a label joins this answer by, and only this one
            params["feedback_id"] = self.feedback.remember(
                model.name, profile.name, tuple(run.asked), run.answers
            )
        return respond.ensemble_outputs(run, agg), params

    async def _doubt(
        self, model: EnsembleModel, profile: Profile, run: EnsembleRun, rows: np.ndarray | None
    ) -> tuple[Doubt | None, bool]:
        """The profile's verdict on the answers so far (None: it checks none), and whether an
        uncertain one was escalated to more members."""
        config = profile.uncertainty
        if config is None or not run.answers:
            return None, False
        watch = model.watch
        outliers = None
        if watch is not None and rows is not None and config.input_outliers is not None:
            outliers = watch.outliers(rows)
        doubt = assess(config, _aggregate(model, profile, run), run.answers, outliers)
        escalated = False
        if doubt.uncertain:
            if config.escalate and not run.late:
                escalated = await run.escalate()
            self.metrics.record_uncertain(model.name, escalated)
        return doubt, escalated


def _traced(model: str, version: str, params: Parameters) -> dict[str, str | bool | int | float]:
    """How the answer was made, as the request span's attributes."""
    out: dict[str, str | bool | int | float] = {
        "ensemble.model": model,
        "ensemble.model.version": version,
    }
    for key in TRACED_PARAMETERS:
        value = params.get(key)
        if value is not None:
            out[f"ensemble.{key}"] = value
    return out


def _aggregate(model: EnsembleModel, profile: Profile, run: EnsembleRun) -> Aggregate:
    """The profile's aggregation of the answers so far."""
    members = {v.name: v for v in run.views}
    ctx = AggregationContext(len(model.classes), members, profile.weights())
    return profile.aggregation.aggregate(run.answers, ctx)
