"""State that outlives a request: what it is, who owns it, and the interface requests use.

Policies are pure (``decide(ctx, state) -> (decision, state)``); the state they carry from one
request to the next lives in a `Cell`, changed only by applying such a transition. Today every
cell is a `LocalCell` in the gateway's process; a cell whose owner is another process or a Ray
actor implements the same two methods, and the request path does not change.

Everything that outlives a request, and its one owner:

=========================================  ==========================  ========================
state                                      owner                       lives as long as
=========================================  ==========================  ========================
selection learning (bandit weights)        ``Profile.learning`` cell   the profile's config
hedge budgets (one per member), retry      ``Profile`` budget cells    the profile's config
budget
answers awaiting feedback, rolling         ``FeedbackHub``             the gateway
accuracy                                   (``ensemble.dataplane.feedback``)
admission (requests running and queued,    ``AdmissionGate`` on the    the gateway
adaptive limit)                            ``Dispatcher``
replica stats, ejections                   ``Member.stats``            the config
live estimates per tier                    ``Member.estimates``        the placement's
                                                                       definition
which version serves, rollout evidence     ``Versions`` (one per       the config (a reload
and decision                               member with several)        that keeps it keeps it)
a split member's measured parts and        ``Member.splitter``         the config
overheads, its ways' call counts
input drift window and score               ``EnsembleModel.watch``     its inputs, reference
                                                                       and window
emulated link settings and partitions      ``Links``                   the gateway
replicas added or drained, scaling state   ``ControlLoop`` and the     the gateway / the config
                                           ``Fleet``'s provisioners
counts, spend, replica-seconds             ``GatewayMetrics``          the gateway
the tracer and its exporter                ``ensemble.tracing``        the process
=========================================  ==========================  ========================

"The config" means a hot reload replaces it; a reload keeps the learning cell of each profile
it leaves unchanged, and carries the estimates and drift windows over while what they are
defined by stays as it was. A gateway of several workers keeps a copy of this state in each;
what they share, and how, is ``ensemble.worker``'s table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

S = TypeVar("S")
R = TypeVar("R")


class Cell(Protocol[S]):
    """One piece of state shared by requests, changed only by pure transitions."""

    def get(self) -> S:
        """The state now (a snapshot: changing it changes nothing)."""
        ...

    def apply(self, transition: Callable[[S], tuple[R, S]]) -> R:
        """Replace the state by the transition's new state; return its result. Transitions of
        one cell never interleave."""
        ...

    def update(self, transition: Callable[[S], S]) -> None:
        """Replace the state by ``transition(state)``."""
        ...


class LocalCell(Generic[S]):
    """A cell in this process (the event loop runs one transition at a time)."""

    __slots__ = ("_value",)

    def __init__(self, value: S) -> None:
        self._value = value

    def get(self) -> S:
        return self._value

    def apply(self, transition: Callable[[S], tuple[R, S]]) -> R:
        result, self._value = transition(self._value)
        return result

    def update(self, transition: Callable[[S], S]) -> None:
        self._value = transition(self._value)
