"""The per-request contract carried in OIP request `parameters`, parsed and checked."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from ensemble.errors import InvalidInput
from ensemble.types import Contract, Param

CONTRACT_KEYS = ("timeout", "priority", "min_accuracy", "max_cost", "tier", "policy", "split")
MAX_SPLIT_NAME = 256
MAX_TIMEOUT_US = 3_600_000_000  # one hour: anything longer is a client bug, not a deadline


def _int(name: str, value: Param, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
    try:
        number = int(value) if not isinstance(value, float) else value
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
        number = int(number)
    if not low <= number <= high:
        raise InvalidInput(f"parameter {name!r} must be between {low} and {high}, got {number}")
    return number


def _float(name: str, value: Param, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidInput(f"parameter {name!r} must be between {low} and {high}, got {value!r}")
    return number


def parse_contract(
    parameters: Mapping[str, Param], *, tiers: Collection[str], profiles: Collection[str]
) -> Contract:
    """The contract in ``parameters``; other keys are left alone (clients send their own)."""
    contract = Contract()
    if "timeout" in parameters:
        # Triton's name and unit: microseconds.
        contract.timeout_us = _int("timeout", parameters["timeout"], 1, MAX_TIMEOUT_US)
    if "priority" in parameters:
        contract.priority = _int("priority", parameters["priority"], 0, 2**31 - 1)
    if "min_accuracy" in parameters:
        contract.min_accuracy = _float("min_accuracy", parameters["min_accuracy"], 0.0, 1.0)
    if "max_cost" in parameters:
        contract.max_cost = _float("max_cost", parameters["max_cost"], 0.0, math.inf)
    if "tier" in parameters:
        tier = parameters["tier"]
        allowed = ["any", *tiers]
        if not isinstance(tier, str) or tier not in allowed:
            raise InvalidInput(
                f"parameter 'tier' must be one of {', '.join(allowed)}; got {tier!r}"
            )
        contract.tier = None if tier == "any" else tier
    if "policy" in parameters:
        policy = parameters["policy"]
        if not isinstance(policy, str) or policy not in profiles:
            known = ", ".join(sorted(profiles))
            raise InvalidInput(
                f"parameter 'policy' names no profile; defined: {known}; got {policy!r}"
            )
        contract.policy = policy
    if "split" in parameters:
        split = parameters["split"]
        if not isinstance(split, str) or not 0 < len(split) <= MAX_SPLIT_NAME:
            raise InvalidInput(
                "parameter 'split' must name where a split member runs: edge, cloud or one "
                "of its cut tensors"
            )
        contract.split = split
    return contract


def bound_by_transport(contract: Contract, left_s: float | None) -> None:
    """A transport's own deadline (gRPC's: ``left_s`` seconds when the call arrived) bounds
    the contract's ``timeout``: the earlier of the two is the request's deadline."""
    if left_s is None:
        return
    left_us = max(1, min(MAX_TIMEOUT_US, int(left_s * 1e6)))
    if contract.timeout_us is None or left_us < contract.timeout_us:
        contract.timeout_us = left_us
