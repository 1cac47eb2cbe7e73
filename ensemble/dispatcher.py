"""The transport-agnostic data plane: validate -> select -> call -> aggregate, with metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from typing import Any

import numpy as np

from ensemble import __version__
from ensemble.admission import AdmissionGate
from ensemble.calls import Call, ResilientCall
from ensemble.contract import parse_contract
from ensemble.errors import (
    ContractUnmet,
    DeadlineExceeded,
    EnsembleError,
    InvalidInput,
    MemberFailed,
    ModelNotReady,
)
from ensemble.feedback import DEFAULT_ACCURACY_WINDOW, FeedbackHub
from ensemble.feedback_store import DEFAULT_MAX_BYTES, DEFAULT_WINDOW
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.base import innermost
from ensemble.replicas.member import Member
from ensemble.repository import VERSION, EnsembleModel, Profile, Repository, ServedModel
from ensemble.types import (
    DEFAULT_PRIORITY,
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
from policies.ensemble_math import estimated_accuracy

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
        allow_non_finite: bool = False,
        feedback: bool = False,
        feedback_window: int = DEFAULT_WINDOW,
        feedback_max_bytes: int = DEFAULT_MAX_BYTES,
        feedback_accuracy_window: int = DEFAULT_ACCURACY_WINDOW,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.allow_non_finite = allow_non_finite
        """Floating-point inputs may hold NaN and infinity (``server.non_finite_inputs``)."""
        self.feedback = FeedbackHub(
            metrics,
            lambda: self.repository,  # read at each use: a reload swaps the repository
            enabled=feedback,
            window=feedback_window,
            max_bytes=feedback_max_bytes,
            accuracy_window=feedback_accuracy_window,
        )
        self.draining = False
        self.gate = AdmissionGate(metrics)
        """Admission control; its policy comes from the repository, so reloads change it."""
        self._rng = random.Random(0)  # routing draws (p2c); seeded for repeatable runs
        metrics.readiness = self._readiness
        metrics.replicas = self._replica_states

    # -- health and metadata ------------------------------------------------------------

    def _readiness(self) -> dict[str, bool]:
        repository = self.repository  # read once: a reload may swap it
        return {n: repository.get(n).ready() for n in repository.names()}

    def _replica_states(self) -> list[tuple[str, str, str, bool, bool, int, int]]:
        states = []
        for m in self.repository.members.values():
            restarts = {r.name: getattr(innermost(r), "restarts", 0) for r in m.replicas}
            states += [
                (m.name, v.name, v.tier, v.ready, v.ejected, m.stats[v.name].ejections,
                 restarts.get(v.name, 0))
                for v in m.replica_views()
            ]  # fmt: skip
        return states

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None) -> ServedModel:
        return self.repository.get(name, version)

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
        self,
        name: str,
        version: str | None,
        protocol: str,
        error: EnsembleError,
        started: float,
    ) -> None:
        """Count a request a frontend refused before ``infer`` (its body, its decoding, an early
        shed) among the requests of its model, or of model "" when the name is unknown."""
        try:
            label = self.repository.get(name, version).name
        except EnsembleError:
            label = ""
        self.metrics.record_request(
            label, protocol, outcome_of(error), time.perf_counter() - started
        )

    async def infer(self, request: InferRequest, protocol: str) -> InferResponse:
        """Answer one request; raises EnsembleError subclasses for every client-visible failure."""
        start = time.perf_counter()
        label = ""  # unknown model names never become label values (unbounded cardinality)
        error: BaseException | None = None
        self.metrics.inflight += 1
        try:
            model = self.repository.get(request.model_name, request.model_version)
            label = model.name
            feed = check_inputs(
                model.metadata, request.inputs, self.max_batch_size, self.allow_non_finite
            )
            check_outputs(model.metadata, request.outputs)
            contract = parse_contract(
                request.parameters,
                tiers=self.repository.tiers,
                profiles=self.repository.profile_names,
            )
            deadline = start + contract.timeout_us / 1e6 if contract.timeout_us else None
            repository = self.repository
            async with self.gate.slot(repository.admission, contract.priority, deadline):
                if isinstance(model, EnsembleModel):
                    outputs, params = await self._ensemble(model, feed, contract, deadline)
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
        profile = self.repository.direct
        call = self._start(member, feed, None, profile, contract, deadline, self.repository.tiers)
        outcome: str | None = None
        try:
            await _wait([call], deadline)
            if not call.future.done():
                call.future.cancel()
                outcome = "timeout"
                raise DeadlineExceeded(f"member {member.name!r} did not answer in time")
            result = call.future.result()
        finally:
            self._record(member.name, call, outcome)
        outputs = [
            Tensor(spec.name, spec.datatype, tuple(result[spec.name].shape), result[spec.name])
            for spec in member.outputs
        ]
        return outputs, {
            "members_answered": f"{member.name}@{call.replica.tier}",
            "cost": round(call.cost, 9),
        }

    def _start(
        self,
        member: Member,
        feed: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
        profile: Profile,
        contract: Contract,
        deadline: float | None,
        tiers: tuple[str, ...],
    ) -> Call:
        """Start one member's call: route it; hedge, retry and time out its attempts as the
        profile says."""
        if len(member.replicas) == 1:  # nothing to route, hedge or fail over to: the cheap path
            return Call(member, member.only(), feed, outputs)
        order = member.route(
            profile.routing, RoutingContext(member.name, contract.tier, tiers), self._rng
        )
        profile.first_attempt()
        if len(order) == 1:
            return Call(member, order[0], feed, outputs)
        retry = profile.retry

        def attempt_timeout(attempts_left: int) -> float | None:
            remaining = None if deadline is None else deadline - time.perf_counter()
            return retry.attempt_timeout_s(remaining, attempts_left)

        return ResilientCall(
            member,
            order,
            feed,
            outputs,
            hedge_delay_s=profile.hedging.delay_s(member.replica_view(order[0])),
            may_hedge=profile.may_hedge,
            may_retry=profile.may_retry,
            max_attempts=retry.max_attempts,
            attempt_timeout=attempt_timeout,
        )

    def _record(self, model: str, call: Call, outcome: str | None = None) -> None:
        if outcome is None:
            future = call.future
            ok = future.done() and not future.cancelled() and future.exception() is None
            outcome = "success" if ok else "error"
        self.metrics.record_member_call(
            call.member.name, call.replica.tier, outcome, call.latency_s()
        )
        self.metrics.record_call_extras(
            model, call.member.name, call.replica.tier, call.retries, call.cost
        )
        if call.hedged:
            self.metrics.record_hedge(call.member.name, call.won_by_hedge)

    async def _ensemble(
        self,
        model: EnsembleModel,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
    ) -> tuple[list[Tensor], Parameters]:
        profile = model.profiles[contract.policy or model.profile]
        run = _Run(self, model, profile, feed, contract, deadline)
        # Selection may go in stages (a cascade escalates while unsure); each stage's calls
        # run concurrently, and everything shares the request's one deadline.
        views = tuple(m.view() for m in model.members.values())
        while not run.late:
            remaining = None if deadline is None else deadline - time.perf_counter()
            ctx = SelectionContext(
                model.name,
                views,
                run.batch,
                contract,
                remaining,
                model.validation,
                tuple(run.asked),
            )
            chosen, profile.state = profile.selection.select(ctx, tuple(run.answers), profile.state)
            if not await run.stage(chosen):
                break
        if not run.asked:
            where = f" on tier {contract.tier!r}" if contract.tier else ""
            raise InvalidInput(f"no member of ensemble {model.name!r} can answer{where}")
        # Members the contract allows that had no ready replica (their server is down, their
        # tier partitioned): the answer could not use them, so it is not a full one.
        run.unreachable = tuple(
            v.name
            for v in views
            if not v.ready
            and v.name not in run.asked
            and (contract.tier is None or contract.tier in v.tiers)
        )
        violations = run.violations()
        action = profile.on_violation
        rerouted = False
        if violations and action == "reroute" and not run.late:
            # Ask every member the policy left out that the contract allows, in one stage.
            rerouted = await run.stage(tuple(model.members), checked=False)
            violations = run.violations()
        if not run.answers and action in ("degrade", "reroute"):
            await run.fall_back()
        self.metrics.record_completeness(model.name, len(run.asked), len(run.answers))
        if violations:
            self.metrics.record_violations(model.name, violations, action)
            if action == "reject":
                raise _violation_error(violations, run)
            if action == "alert":
                _log_violation(model.name, violations, run)
        if not run.answers:
            raise _no_answer(run.failures, run.late)
        members = {v.name: v for v in views}
        agg = profile.aggregation.aggregate(
            run.answers, AggregationContext(len(model.classes), members, profile.weights())
        )
        labels = model.labels[agg.class_index]
        probs = np.ascontiguousarray(agg.probabilities, dtype=np.float32)
        outputs = [
            Tensor("label", model.metadata.outputs[0].datatype, (run.batch,), labels),
            Tensor("probabilities", "FP32", tuple(probs.shape), probs),
        ]
        answered = tuple((a.member, a.tier) for a in run.answers)
        params = dict(_describe(profile.name, tuple(run.asked), answered))
        params["confidence"] = round(float(agg.confidence.min()), 6)
        params["cost"] = round(run.cost, 9)
        accuracy = run.estimated_accuracy()
        if accuracy is not None:
            params["estimated_accuracy"] = round(accuracy, 6)
        if deadline is not None:
            params["deadline_met"] = not run.late
        if run.hedges:
            params["hedges"] = run.hedges
        if run.retries:
            params["retries"] = run.retries
        degraded = bool(violations) or run.fallback_used
        if degraded:
            params["degraded"] = True
            if violations:
                params["violations"] = ",".join(violations)
            if run.unreachable:
                params["unreachable"] = ",".join(run.unreachable)
            self.metrics.record_degraded(model.name)
        if run.fallback_used:
            params["fallback"] = str(profile.fallback)
        if rerouted:
            params["rerouted"] = True
        if self.feedback.enabled:  # the id a label joins this answer by, and only this one
            params["feedback_id"] = self.feedback.remember(
                model.name, profile.name, tuple(run.asked), run.answers
            )
        return outputs, params


_VIOLATION_KINDS = ("deadline", "availability", "accuracy", "cost")
_log = logging.getLogger("ensemble.contract")
_last_alert: dict[str, float] = {}


class _Run:
    """One ensemble request's calls: who was asked, what came back, what it cost."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        model: EnsembleModel,
        profile: Profile,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
    ) -> None:
        self.dispatcher = dispatcher
        self.model = model
        self.profile = profile
        self.feed = feed
        self.contract = contract
        self.deadline = deadline
        self.batch = next(iter(feed.values())).shape[0]
        self.asked: list[str] = []
        self.answers: list[MemberAnswer] = []
        self.failures: list[tuple[str, BaseException]] = []
        self.late = False
        self.hedges = 0
        self.retries = 0
        self.cost = 0.0
        self.fallback_used = False
        self.unreachable: tuple[str, ...] = ()
        """Members the contract allows that were not asked because none of their replicas
        was ready (an availability violation)."""

    def _allowed(self, name: str, *, checked: bool) -> bool:
        """Whether ``name`` may be asked now; ``checked``: the selection policy already checked
        readiness and the contract's tier (a reroute or fallback checks them here)."""
        member = self.model.members.get(name)
        if member is None or name in self.asked:
            return False
        if checked:
            return True
        tier = self.contract.tier
        return member.ready() and (tier is None or tier in member.tiers)

    async def stage(self, names: tuple[str, ...], *, checked: bool = True) -> bool:
        """Ask ``names`` (those not asked yet and allowed) concurrently, until they answer or
        the deadline; whether anyone was asked."""
        chosen = [n for n in dict.fromkeys(names) if self._allowed(n, checked=checked)]
        if not chosen:
            return False
        calls = self._start(chosen)
        fallback = self._fallback_member()
        if fallback is not None and self.deadline is not None and not self.answers:
            # Wait until just before the deadline, leaving the fallback member time to answer;
            # if nothing usable has arrived by then, ask it too.
            early = self.deadline - _reserve_s(fallback, self.contract.timeout_us)
            await _wait(calls, early)
            if not any(_succeeded(c) for c in calls) and time.perf_counter() < self.deadline:
                calls.extend(self._start([fallback.name]))
                self.fallback_used = True
        await _wait(calls, self.deadline)
        self._collect(calls)
        return True

    async def fall_back(self) -> None:
        """Nothing answered: ask the fallback member, if the profile has one and time remains."""
        fallback = self._fallback_member()
        if fallback is None or (self.deadline is not None and time.perf_counter() >= self.deadline):
            return
        calls = self._start([fallback.name])
        self.fallback_used = True
        await _wait(calls, self.deadline)
        self._collect(calls)

    def _fallback_member(self) -> Member | None:
        name = self.profile.fallback
        if name is None or self.profile.on_violation not in ("degrade", "reroute"):
            return None
        return self.model.members[name] if self._allowed(name, checked=False) else None

    def _start(self, names: list[str]) -> list[Call]:
        self.asked.extend(names)
        calls = []
        model = self.model
        for name in names:
            member = model.members[name]
            try:
                calls.append(
                    self.dispatcher._start(
                        member,
                        model.member_feed(member, self.feed),
                        member.score_outputs,
                        self.profile,
                        self.contract,
                        self.deadline,
                        model.tiers,
                    )
                )
            except ModelNotReady as exc:  # no replica it may use: a failure like any other
                self.failures.append((name, exc))
        return calls

    def _collect(self, calls: list[Call]) -> None:
        record = self.dispatcher._record
        for call in calls:
            self.hedges += call.hedged
            self.retries += call.retries
            self.cost += call.cost
            if not call.future.done():
                self.late = True  # at the deadline: answer with what arrived
                call.future.cancel()
                record(self.model.name, call, "timeout")
                self.failures.append((call.member.name, DeadlineExceeded("no answer in time")))
                continue
            record(self.model.name, call)
            try:
                scores = call.member.scores(call.future.result())
            except Exception as exc:
                self.failures.append((call.member.name, exc))
                continue
            self.answers.append(
                MemberAnswer(
                    call.member.name,
                    call.replica.tier,
                    call.replica.name,
                    scores,
                    call.latency_s(),
                )
            )

    def estimated_accuracy(self) -> float | None:
        """Expected accuracy of the members that answered, from the validation set."""
        if not self.answers:
            return None
        return _subset_accuracy(self.model, frozenset(a.member for a in self.answers))

    def violations(self) -> tuple[str, ...]:
        """How the contract is not met so far, in ``_VIOLATION_KINDS`` order."""
        kinds: list[str] = []
        if self.late:
            kinds.append("deadline")
        # A member the input made fail (non-finite scores from allowed NaN input) is no sign
        # of an unavailable member; a late one is counted as `deadline`.
        if self.unreachable or any(
            not isinstance(f, DeadlineExceeded | InvalidInput) for _, f in self.failures
        ):
            kinds.append("availability")
        wanted = self.contract.min_accuracy
        if wanted is not None:
            accuracy = self.estimated_accuracy()
            if accuracy is not None and accuracy < wanted:
                kinds.append("accuracy")
        budget = self.contract.max_cost
        if budget is not None and self.cost > budget * (1 + 1e-9):
            kinds.append("cost")
        return tuple(kinds)


def _succeeded(call: Call) -> bool:
    f = call.future
    return f.done() and not f.cancelled() and f.exception() is None


def _reserve_s(member: Member, timeout_us: int | None) -> float:
    """Time to leave a fallback member before the deadline: twice its replicas' worst observed
    p95 (else its card's) plus 2 ms, and at least a tenth of the request's timeout (a busy
    gateway is slower than any window saw)."""
    observed = [s.p95_s for s in member.stats.values() if s.p95_s is not None]
    expected = max(observed) if observed else member.view().latency_p95_s or 0.0
    share = (timeout_us or 0) / 1e7
    return max(2.0 * expected + 0.002, share)


def _subset_accuracy(model: EnsembleModel, members: frozenset[str]) -> float | None:
    cache = model.accuracy_cache
    if members not in cache:
        views = [model.members[m].view() for m in members]
        known = model.validation is not None or all(v.accuracy is not None for v in views)
        cache[members] = estimated_accuracy(views, model.validation) if known else None
    return cache[members]


def _violation_error(kinds: tuple[str, ...], run: _Run) -> EnsembleError:
    """The error a `reject` profile answers with: the first kind decides the status."""
    detail = _violation_detail(kinds, run)
    kind = kinds[0]
    if kind == "deadline":
        return DeadlineExceeded(f"contract not met ({detail})")
    if kind == "availability":
        return MemberFailed(f"contract not met ({detail})")
    return ContractUnmet(f"contract not met ({detail})")


def _violation_detail(kinds: tuple[str, ...], run: _Run) -> str:
    parts = []
    for kind in kinds:
        if kind == "deadline":
            parts.append("deadline: not every member answered before the request's timeout")
        elif kind == "availability":
            failed = ", ".join(sorted({n for n, f in run.failures}))
            if failed:
                parts.append(f"availability: members failed: {failed}")
            if run.unreachable:
                parts.append(f"availability: members not ready: {', '.join(run.unreachable)}")
        elif kind == "accuracy":
            accuracy = run.estimated_accuracy() or 0.0
            parts.append(
                f"accuracy: estimated {accuracy:.4f} < min_accuracy {run.contract.min_accuracy}"
            )
        else:
            parts.append(f"cost: spent {run.cost:.6g} > max_cost {run.contract.max_cost}")
    return "; ".join(parts)


def _log_violation(ensemble: str, kinds: tuple[str, ...], run: _Run) -> None:
    """`alert`: a warning per ensemble at most once a second (the counter has every one)."""
    now = time.monotonic()
    if now - _last_alert.get(ensemble, -1e9) >= 1.0:
        _last_alert[ensemble] = now
        _log.warning("ensemble %s: contract not met: %s", ensemble, _violation_detail(kinds, run))


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
    if not calls:
        return
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
