"""Every registered split policy: it names one of the options, a ready one when any is, and
the same one for the same context (a pure decision)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.types import SplitContext, SplitOption
from policies import registry
from policies.base import SplitPolicy
from policies.split import expected_s
from tests.conformance.registered import build, check_entry

SPLITS = registry.names("split")

option = st.builds(
    SplitOption,
    name=st.sampled_from(["edge", "cloud", "a", "b", "c"]),
    head_s=st.floats(0, 1),
    tail_s=st.floats(0, 1),
    sent_bytes=st.integers(0, 10**6),
    returned_bytes=st.integers(0, 10**4),
    ready=st.booleans(),
)
contexts = st.builds(
    SplitContext,
    member=st.just("m"),
    rows=st.integers(1, 64),
    options=st.lists(option, min_size=1, max_size=6, unique_by=lambda o: o.name).map(tuple),
    delay_s=st.floats(0, 1),
    bandwidth_bytes_per_s=st.none() | st.floats(1, 1e10),
)


def test_builtins_registered() -> None:
    assert {"latency", "fixed"} <= set(SPLITS)


@pytest.mark.parametrize("name", SPLITS)
def test_entry_is_documented_and_strict(name: str) -> None:
    check_entry("split", name)


@pytest.mark.parametrize("name", SPLITS)
@settings(max_examples=200, deadline=None)
@given(ctx=contexts)
def test_names_an_option_a_ready_one_when_any_and_always_the_same(
    name: str, ctx: SplitContext
) -> None:
    policy = build("split", name, SplitPolicy)
    chosen = policy.choose(ctx)
    by_name = {o.name: o for o in ctx.options}
    assert chosen in by_name
    if any(o.ready for o in ctx.options):
        assert by_name[chosen].ready
    assert policy.choose(ctx) == chosen


def test_least_latency_follows_the_link() -> None:
    """Neurosurgeon's trade: a fast link sends the input to the fast tier, a slow one keeps the
    work on the edge, a thin one sends the small cut tensor."""
    options = (
        SplitOption("edge", head_s=0.008, tail_s=0, sent_bytes=0, returned_bytes=0),
        SplitOption("cloud", head_s=0, tail_s=0.0001, sent_bytes=256, returned_bytes=48),
        SplitOption("cut", head_s=0.0002, tail_s=0.0001, sent_bytes=64, returned_bytes=48),
    )
    policy = build("split", "latency", SplitPolicy)

    def choice(delay_s: float, bandwidth: float | None) -> str:
        return policy.choose(SplitContext("m", 1, options, delay_s, bandwidth))

    assert choice(0.0005, None) == "cloud"
    assert choice(0.030, 2e6) == "edge"
    assert choice(0.001, 30_000) == "cut"
    ctx = SplitContext("m", 1, options, 0.001, 30_000)
    assert expected_s(options[2], ctx) == pytest.approx(0.0003 + 0.002 + 112 / 30_000)
    assert expected_s(options[0], ctx) == 0.008  # nothing crosses the link
