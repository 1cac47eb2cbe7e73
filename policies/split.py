"""Split policies: where a split member runs one call (Neurosurgeon, Kang et al. ASPLOS'17)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ensemble.types import SplitContext, SplitOption
from policies.registry import NoParams, register


def expected_s(option: SplitOption, ctx: SplitContext) -> float:
    """An option's expected latency now: compute on each tier, its measured overhead, and
    for an option that crosses the link both legs' delay and its bytes at its bandwidth."""
    total = option.head_s + option.tail_s + option.overhead_s
    if option.sent_bytes or option.returned_bytes:
        total += 2 * ctx.delay_s
        if ctx.bandwidth_bytes_per_s:
            total += (option.sent_bytes + option.returned_bytes) / ctx.bandwidth_bytes_per_s
    return total


def _usable(ctx: SplitContext) -> tuple[SplitOption, ...]:
    ready = tuple(o for o in ctx.options if o.ready)
    return ready or ctx.options


@register("split", "latency")
class LeastLatency:
    """The option with the least expected latency now: per-cut compute measured on each tier,
    the cut tensor's bytes, the link's delay and bandwidth as they are."""

    def __init__(self, params: NoParams) -> None:
        del params

    def choose(self, ctx: SplitContext) -> str:
        return min(_usable(ctx), key=lambda o: expected_s(o, ctx)).name


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: str = Field("edge", min_length=1, description="`edge`, `cloud` or a cut tensor's name.")


@register("split", "fixed", params=FixedParams)
class Fixed:
    """Always the same option (when it is ready): a static partition, for comparison."""

    def __init__(self, params: FixedParams | None = None) -> None:
        self.at = (params or FixedParams()).at

    def choose(self, ctx: SplitContext) -> str:
        usable = _usable(ctx)
        names = [o.name for o in usable]
        return self.at if self.at in names else names[0]
