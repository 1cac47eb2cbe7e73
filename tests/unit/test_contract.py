"""Parsing the request contract: good values, clear errors for bad ones."""

from __future__ import annotations

import pytest

from ensemble.dataplane.contract import parse_contract
from ensemble.errors import InvalidInput
from ensemble.types import Contract, Param

TIERS = ("edge", "cloud")
PROFILES = ("default", "fast")


def parse(**params: Param) -> Contract:
    return parse_contract(params, tiers=TIERS, profiles=PROFILES)


def test_empty_and_unrelated_parameters() -> None:
    assert parse() == Contract()
    assert parse(binary_data_output=True, sequence_id=4) == Contract()


def test_every_field() -> None:
    c = parse(
        timeout=250_000, priority=2, min_accuracy=0.95, max_cost=0.5, tier="edge", policy="fast"
    )
    assert c == Contract(250_000, 2, 0.95, 0.5, "edge", "fast")
    assert parse(tier="any").tier is None
    assert parse(timeout="1000", priority=3.0).timeout_us == 1000  # lenient on number types


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"timeout": 0}, "'timeout' must be between 1"),
        ({"timeout": -5}, "'timeout' must be between"),
        ({"timeout": 1.5}, "'timeout' must be an integer"),
        ({"timeout": "soon"}, "'timeout' must be an integer"),
        ({"timeout": True}, "'timeout' must be an integer"),
        ({"timeout": 10**13}, "'timeout' must be between"),
        ({"priority": -1}, "'priority' must be between 0"),
        ({"min_accuracy": 1.5}, "'min_accuracy' must be between 0.0 and 1.0"),
        ({"min_accuracy": "high"}, "'min_accuracy' must be a number"),
        ({"max_cost": -0.1}, "'max_cost' must be between"),
        ({"max_cost": "nan"}, "'max_cost' must be between"),
        ({"tier": "moon"}, "'tier' must be one of any, edge, cloud"),
        ({"tier": 3}, "'tier' must be one of"),
        ({"policy": "turbo"}, "'policy' names no profile; defined: default, fast"),
    ],
)
def test_bad_values(params: dict[str, Param], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment.replace("(", r"\(")):
        parse(**params)
