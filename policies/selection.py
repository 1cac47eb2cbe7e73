"""Selection policies: which members answer a request."""

from __future__ import annotations

from ensemble.types import SelectionContext
from policies.registry import NoParams, register


@register("selection", "all")
class SelectAll:
    """Ask every ready member (all members when none is ready, so the error is explicit)."""

    def __init__(self, params: NoParams) -> None:
        del params

    def select(self, ctx: SelectionContext) -> tuple[str, ...]:
        ready = tuple(m.name for m in ctx.members if m.ready)
        return ready or tuple(m.name for m in ctx.members)
