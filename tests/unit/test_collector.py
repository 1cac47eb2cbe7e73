"""A serving process runs the cyclic collector's young collections less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ensemble.server import YOUNG_COLLECTION_ALLOCATIONS, tune_collector


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_young_collections_wait_for_more_allocations(thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    tune_collector()
    assert gc.get_threshold() == (YOUNG_COLLECTION_ALLOCATIONS, 10, 10)
    gc.set_threshold(50_000, 20, 5)  # an operator's own, higher setting is kept
    tune_collector()
    assert gc.get_threshold() == (50_000, 20, 5)
