"""One ensemble request's member calls: selection in stages, reroute and fallback under the
profile's `on_violation`, everything within the request's one deadline."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np

from ensemble.clock import Clock
from ensemble.dataplane import verdict
from ensemble.dataplane.calls import Call, Stage
from ensemble.dataplane.fanout import (
    mirror,
    record_call,
    start_call,
    succeeded,
    version_for,
    wait_calls,
)
from ensemble.errors import DeadlineExceeded, ModelNotReady
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import Member
from ensemble.repository import EnsembleModel, Profile
from ensemble.types import (
    Contract,
    MemberAnswer,
    MemberView,
    Pick,
    RoutingContext,
    SelectionContext,
)
from policies.ensemble_math import estimated_accuracy
from policies.selection import allowed_views, fits, pick, placement_for


class EnsembleRun:
    """Who was asked, what came back, what it cost, for one request."""

    def __init__(
        self,
        model: EnsembleModel,
        profile: Profile,
        feed: dict[str, np.ndarray],
        contract: Contract,
        deadline: float | None,
        *,
        metrics: GatewayMetrics,
        rng: random.Random,
        clock: Clock,
    ) -> None:
        self.model = model
        self.profile = profile
        self.feed = feed
        self.contract = contract
        self.deadline = deadline
        self.metrics = metrics
        self.rng = rng
        self.clock = clock
        self.batch = next(iter(feed.values())).shape[0]
        self.views: tuple[MemberView, ...] = tuple(m.view() for m in model.members.values())
        self.asked: list[str] = []
        self.answers: list[MemberAnswer] = []
        self.failures: list[tuple[str, BaseException]] = []
        self.late = False
        self.stages = 0
        """Selection stages that asked someone (a cascade's escalations are the ones after
        the first)."""
        self.hedges = 0
        self.retries = 0
        self.cost = 0.0
        self.fallback_used = False
        self.unreachable: tuple[str, ...] = ()
        """Members the contract allows that were not asked because none of their replicas
        was ready (an availability violation)."""

    async def select(self) -> None:
        """Ask the members the selection policy names, stage after stage (a cascade escalates
        while unsure; each stage's calls run concurrently) until it names none or time is up;
        then note the members that could not be asked for want of a ready replica."""
        profile, model = self.profile, self.model
        while not self.late:
            remaining = None if self.deadline is None else self.deadline - self.clock.now()
            ctx = SelectionContext(
                model.name,
                self.views,
                self.batch,
                self.contract,
                remaining,
                model.validation,
                tuple(self.asked),
            )
            answers = tuple(self.answers)
            chosen = profile.learning.apply(
                lambda state: profile.selection.select(ctx, answers, state)  # noqa: B023
            )
            if not await self.stage(chosen):
                break
            self.stages += 1
            if len(self.asked) >= len(self.views):
                break  # everyone was asked: no stage could ask anyone more
        tier = self.contract.tier
        self.unreachable = tuple(
            v.name
            for v in self.views
            if not v.ready and v.name not in self.asked and (tier is None or tier in v.tiers)
        )

    async def stage(self, names: tuple[str | Pick, ...], *, checked: bool = True) -> bool:
        """Ask ``names`` (those not asked yet and allowed; a ``Pick`` on its tier first)
        concurrently, until they answer or the deadline; whether anyone was asked. ``checked``:
        the selection policy already checked readiness and the contract's tier (a reroute or
        fallback checks them here)."""
        tiers: dict[str, str | None] = {}
        for chosen in names:
            name, tier = (chosen, None) if isinstance(chosen, str) else (chosen.member, chosen.tier)
            if name not in tiers and self._allowed(name, checked=checked):
                tiers[name] = tier
        if not tiers:
            return False
        calls = self._start(list(tiers), tiers)
        stage = Stage()
        stage.add(calls)
        fallback = self._fallback_member()
        if fallback is not None and self.deadline is not None and not self.answers:
            # Wait until just before the deadline, leaving the fallback member time to answer;
            # if nothing usable has arrived by then, ask it too.
            early = self.deadline - _reserve_s(fallback, self.contract.timeout_us)
            await wait_calls(calls, early, self.clock)
            if not any(succeeded(c) for c in calls) and self.clock.now() < self.deadline:
                more = self._start([fallback.name])
                stage.add(more)
                calls.extend(more)
                self.fallback_used = True
        await wait_calls(calls, self.deadline, self.clock)
        self._collect(calls)
        return True

    async def escalate(self) -> bool:
        """Ask, in one stage, the members not asked yet that the contract allows, each on a
        tier that fits the time left by its live estimates (an uncertain answer wants more
        opinions, not a late one); whether anyone was asked."""
        remaining = None if self.deadline is None else self.deadline - self.clock.now()
        ctx = SelectionContext(self.model.name, self.views, self.batch, self.contract, remaining)
        picks: list[str | Pick] = []
        for view in allowed_views(ctx):
            placement = placement_for(view, ctx)
            if view.name not in self.asked and fits(placement, ctx, "p95"):
                picks.append(pick(view, placement))
        return await self.stage(tuple(picks))

    async def reroute(self) -> bool:
        """Ask every member the policy left out that the contract allows, in one stage."""
        return await self.stage(tuple(self.model.members), checked=False)

    async def fall_back(self) -> None:
        """Nothing answered: ask the fallback member, if the profile has one and time remains."""
        fallback = self._fallback_member()
        if fallback is None or (self.deadline is not None and self.clock.now() >= self.deadline):
            return
        calls = self._start([fallback.name])
        self.fallback_used = True
        await wait_calls(calls, self.deadline, self.clock)
        self._collect(calls)

    def estimated_accuracy(self) -> float | None:
        """Expected accuracy of the members that answered, from the validation set."""
        if not self.answers:
            return None
        return _subset_accuracy(self.model, frozenset(a.member for a in self.answers))

    def violations(self) -> tuple[str, ...]:
        """How the contract is not met so far."""
        return verdict.violations(
            self.contract,
            late=self.late,
            failures=self.failures,
            unreachable=self.unreachable,
            accuracy=self.estimated_accuracy(),
            cost=self.cost,
        )

    def detail(self, kinds: tuple[str, ...]) -> str:
        return verdict.detail(
            kinds,
            self.contract,
            failures=self.failures,
            unreachable=self.unreachable,
            accuracy=self.estimated_accuracy(),
            cost=self.cost,
        )

    def _allowed(self, name: str, *, checked: bool) -> bool:
        member = self.model.members.get(name)
        if member is None or name in self.asked:
            return False
        if checked:
            return True
        tier = self.contract.tier
        return member.ready() and (tier is None or tier in member.tiers)

    def _fallback_member(self) -> Member | None:
        name = self.profile.fallback
        if name is None or self.profile.on_violation not in ("degrade", "reroute"):
            return None
        return self.model.members[name] if self._allowed(name, checked=False) else None

    def _start(self, names: list[str], tiers: Mapping[str, str | None] | None = None) -> list[Call]:
        self.asked.extend(names)
        calls = []
        model = self.model
        for name in names:
            member, shadow = version_for(model.members[name], self.rng)
            feed = model.member_feed(member, self.feed)
            try:
                call = start_call(
                    member,
                    feed,
                    member.score_outputs,
                    self.profile,
                    self.contract,
                    self.deadline,
                    model.tiers,
                    self.rng,
                    self.clock,
                    tier=tiers.get(name) if tiers else None,
                )
            except ModelNotReady as exc:  # no replica it may use: a failure like any other
                self.failures.append((name, exc))
                continue
            calls.append(call)
            if shadow is not None:
                routing = RoutingContext(name, self.contract.tier, model.tiers)
                mirror(
                    call, shadow, feed, member.score_outputs, routing, self.profile, self.rng,
                    lambda copy: record_call(self.metrics, model.name, copy),
                )  # fmt: skip
        return calls

    def _collect(self, calls: list[Call]) -> None:
        for call in calls:
            self.hedges += call.hedged
            self.retries += call.retries
            self.cost += call.cost
            if not call.future.done():
                self.late = True  # at the deadline: answer with what arrived
                call.future.cancel()
                record_call(self.metrics, self.model.name, call, "timeout")
                self.failures.append((call.member.name, DeadlineExceeded("no answer in time")))
                continue
            record_call(self.metrics, self.model.name, call)
            try:
                scores = self.model.member_scores(call.member, call.future.result())
            except Exception as exc:
                self.failures.append((call.member.name, exc))
                continue
            member = call.member
            version = member.version if member.versions is not None else None
            replica = call.replica
            answer = MemberAnswer(
                member.name, replica.tier, replica.name, scores, call.latency_s(), version
            )
            self.answers.append(answer)


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
