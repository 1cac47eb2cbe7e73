"""Member calls: start one (routed, hedged, retried as the profile says), wait, record."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import numpy as np

from ensemble.clock import Clock
from ensemble.dataplane.calls import Call, ResilientCall
from ensemble.errors import EnsembleError, ModelNotReady
from ensemble.metrics import GatewayMetrics
from ensemble.replicas.member import Member
from ensemble.repository import Profile
from ensemble.types import Contract, RoutingContext


def start_call(
    member: Member,
    feed: dict[str, np.ndarray],
    outputs: tuple[str, ...] | None,
    profile: Profile,
    contract: Contract,
    deadline: float | None,
    tiers: tuple[str, ...],
    rng: random.Random,
    clock: Clock,
    *,
    tier: str | None = None,
) -> Call:
    """Start one member's call: route it (the replicas on ``tier``, when the selection policy
    chose one, first; the others stay fallbacks); hedge, retry and time out its attempts as the
    profile says. A split member's call takes the path its splitter chooses (or the request's
    `split`). ModelNotReady when no replica it may use is ready."""
    if member.splitter is not None:
        rows = next(iter(feed.values())).shape[0]
        path = member.splitter.choose(rows, contract.split, contract.tier)
        return Call(member, path, feed, outputs)
    if len(member.replicas) == 1:  # nothing to route, hedge or fail over to: the cheap path
        return Call(member, member.only(), feed, outputs)
    ctx = RoutingContext(member.name, contract.tier, tiers)
    order = member.route(profile.routing, ctx, rng, prefer=tier)
    name = member.name
    profile.first_attempt(name)
    if len(order) == 1:
        return Call(member, order[0], feed, outputs)
    retry = profile.retry

    def attempt_timeout(attempts_left: int) -> float | None:
        remaining = None if deadline is None else deadline - clock.now()
        return retry.attempt_timeout_s(remaining, attempts_left)

    primary = order[0]
    peers = [member.replica_view(r) for r in order[1:] if r.tier == primary.tier]
    return ResilientCall(
        member,
        order,
        feed,
        outputs,
        hedge_delay_s=profile.hedging.delay_s(member.replica_view(primary), peers),
        may_hedge=lambda: profile.may_hedge(name),
        may_retry=profile.may_retry,
        max_attempts=retry.max_attempts,
        attempt_timeout=attempt_timeout,
    )


def version_for(member: Member, rng: random.Random) -> tuple[Member, Member | None]:
    """The version of ``member`` an unversioned call goes to (its rollout's canary takes a
    share), and a version that gets a mirrored copy of the call (a shadow; None: none)."""
    several = member.versions
    return (member, None) if several is None else several.route(rng)


def mirror(
    primary: Call,
    shadow: Member,
    feed: dict[str, np.ndarray],
    outputs: tuple[str, ...] | None,
    routing: RoutingContext,
    profile: Profile,
    rng: random.Random,
    record: Callable[[Call], None],
) -> None:
    """Send ``shadow`` a copy of ``primary``'s call: its answer is compared with the primary's
    (rows alike) once both finish, recorded (``record``), and never returned. A shadow with no
    ready replica is skipped."""
    try:
        replica = shadow.route(profile.routing, routing, rng)[0]
    except ModelNotReady:
        return
    copy = Call(shadow, replica, feed, outputs)
    several = shadow.versions
    left = 2

    def landed(_: object) -> None:
        nonlocal left
        left -= 1
        if left:
            return
        record(copy)
        if several is None or not (succeeded(primary) and succeeded(copy)):
            return
        try:
            ours = primary.member.scores(primary.future.result()).argmax(axis=1)
            theirs = shadow.scores(copy.future.result()).argmax(axis=1)
        except EnsembleError:
            return  # an unusable answer: its call counted as an error already
        several.compared(int(np.count_nonzero(ours == theirs)), int(ours.size))

    primary.future.add_done_callback(landed)
    copy.future.add_done_callback(landed)


def record_call(
    metrics: GatewayMetrics, model: str, call: Call, outcome: str | None = None
) -> None:
    """Count a finished (or abandoned: ``outcome="timeout"``) call of ``model``'s request; a
    call of a member's version under a rollout is evidence for it."""
    if outcome is None:
        outcome = "success" if succeeded(call) else "error"
    several = call.member.versions
    if several is not None:
        several.observe(call.member.version, outcome == "success", call.latency_s())
    member, tier = call.member.label, call.replica.tier
    metrics.record_member_call(member, tier, outcome, call.latency_s())
    metrics.record_call_extras(model, member, tier, call.retries, call.cost)
    if call.hedged:
        metrics.record_hedge(member, tier, call.won_by_hedge)


def succeeded(call: Call) -> bool:
    f = call.future
    return f.done() and not f.cancelled() and f.exception() is None


async def wait_calls(calls: list[Call], deadline: float | None, clock: Clock) -> None:
    """Wait for every call until the deadline, on ``clock``'s timers; cancel the calls if the
    request itself is cancelled."""
    pending = [c.future for c in calls if not c.future.done()]
    if not pending:
        return
    woken = asyncio.get_running_loop().create_future()
    left = len(pending)

    def landed(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not woken.done():
            woken.set_result(None)

    def expired() -> None:
        if not woken.done():
            woken.set_result(None)

    for future in pending:
        future.add_done_callback(landed)
    timer = None if deadline is None else clock.call_later(deadline - clock.now(), expired)
    try:
        await woken
    except asyncio.CancelledError:
        for call in calls:
            call.future.cancel()  # a queued in-process call is then skipped
        raise
    finally:
        if timer is not None:
            timer.cancel()
        for future in pending:
            future.remove_done_callback(landed)
