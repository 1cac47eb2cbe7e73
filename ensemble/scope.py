"""The request a piece of work belongs to: its deadline and priority, carried by a context
variable across the tasks and callbacks the request starts (hedges, retries, batched calls),
so replica clients send them on to the servers they call (Go's ``context.Context``, implicit).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ensemble.clock import Clock
from ensemble.types import DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class RequestScope:
    """One request's deadline (on ``clock``; None: none) and priority."""

    deadline: float | None
    priority: int
    clock: Clock

    def remaining_s(self) -> float | None:
        """Time left before the deadline (negative once it passed); None without one."""
        return None if self.deadline is None else self.deadline - self.clock.now()


_CURRENT: ContextVar[RequestScope | None] = ContextVar("ensemble_request", default=None)


class request_scope:  # lower case: used like the function it replaced
    """Work started inside (and the tasks it creates) belongs to this request (a class, not
    a generator context manager: it runs on every request)."""

    __slots__ = ("_scope", "_token")

    def __init__(self, deadline: float | None, priority: int, clock: Clock) -> None:
        self._scope = RequestScope(deadline, priority, clock)

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._scope)

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._token)


def current() -> RequestScope | None:
    """The request the running code works for; None outside any (health checks, warm-ups)."""
    return _CURRENT.get()


def outgoing(cap_s: float | None = None) -> tuple[int | None, int | None]:
    """What a call to another server says of the current request: the time left in whole
    microseconds (at least 1; capped at ``cap_s``) and the priority, each None when the
    request sets none (no deadline, the default priority) or there is no request."""
    scope = _CURRENT.get()
    if scope is None:
        return None, None
    left = scope.remaining_s()
    if left is not None and cap_s is not None:
        left = min(left, cap_s)
    timeout_us = None if left is None else max(1, int(left * 1e6))
    priority = None if scope.priority == DEFAULT_PRIORITY else scope.priority
    return timeout_us, priority
