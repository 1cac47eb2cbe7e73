"""The store of answers kept for feedback: ids, compact classes, count and byte bounds."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from ensemble.dataplane.feedback_store import (
    ENTRY_OVERHEAD_BYTES,
    Answered,
    AnswerStore,
    class_dtype,
    mint_feedback_id,
)
from ensemble.types import MemberAnswer

MEMBERS = ("a", "b", "c", "d", "e")


def answers(batch: int, n_classes: int = 10, seed: int = 0) -> list[MemberAnswer]:
    rng = np.random.default_rng(seed)
    return [
        MemberAnswer(m, "edge", "edge/0", rng.random((batch, n_classes), dtype=np.float32), 0.001)
        for m in MEMBERS
    ]


def entry(batch: int = 1, n_classes: int = 10, seed: int = 0) -> Answered:
    return Answered.of("digits", "default", MEMBERS, answers(batch, n_classes, seed))


def test_ids_are_long_random_and_url_safe() -> None:
    ids = {mint_feedback_id() for _ in range(2000)}
    assert len(ids) == 2000
    for feedback_id in list(ids)[:50]:
        assert len(feedback_id) == 22  # 16 random bytes, base64url without padding
        assert all(c.isalnum() or c in "-_" for c in feedback_id)


def test_an_entry_keeps_each_members_top_class_in_the_smallest_type() -> None:
    given = answers(batch=4)
    kept = Answered.of("digits", "default", MEMBERS, given)
    assert kept.predicted is not None
    assert kept.predicted.dtype == np.uint8 and kept.predicted.shape == (5, 4)
    for row, answer in enumerate(given):
        np.testing.assert_array_equal(kept.predicted[row], answer.probabilities.argmax(axis=1))
    assert kept.members == MEMBERS and kept.batch == 4 and kept.n_classes == 10
    assert kept.nbytes == ENTRY_OVERHEAD_BYTES + 5 * 4
    assert class_dtype(256) == np.uint8 and class_dtype(257) == np.uint16
    assert class_dtype(1) == np.uint8 and class_dtype(70_000) == np.uint32


def test_count_bound_evicts_oldest_first() -> None:
    store = AnswerStore(capacity=3)
    ids = [store.remember(entry(seed=i)) for i in range(5)]
    assert len(store) == 3
    assert ids[0] not in store and ids[1] not in store
    assert all(i in store for i in ids[2:])
    assert store.nbytes == 3 * (ENTRY_OVERHEAD_BYTES + 5)


def test_byte_bound_evicts_oldest_first_and_is_never_exceeded() -> None:
    size = entry(batch=1024).nbytes  # 5 members x 1,024 rows x 1 byte + overhead
    assert size == ENTRY_OVERHEAD_BYTES + 5 * 1024
    store = AnswerStore(capacity=1000, max_bytes=3 * size + ENTRY_OVERHEAD_BYTES + 100)
    ids = []
    for i in range(6):
        ids.append(store.remember(entry(batch=1024, seed=i)))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 3 and store.nbytes == 3 * size
    assert [i in store for i in ids] == [False, False, False, True, True, True]
    # Small answers fill what large ones leave: the bound is in bytes, not answers.
    store.remember(entry(batch=1))
    assert len(store) == 4 and store.nbytes == 3 * size + ENTRY_OVERHEAD_BYTES + 5
    store.remember(entry(batch=1024))
    assert ids[3] not in store and store.nbytes <= store.max_bytes


def test_an_answer_larger_than_the_budget_is_not_kept() -> None:
    store = AnswerStore(capacity=10, max_bytes=ENTRY_OVERHEAD_BYTES + 100)
    small = store.remember(entry(batch=1))
    big = store.remember(entry(batch=1024))
    assert big not in store and small in store


def test_settle_frees_the_classes_and_keeps_the_entry_for_duplicates() -> None:
    store = AnswerStore()
    kept = entry(batch=8)
    feedback_id = store.remember(kept)
    predicted = store.settle(feedback_id)
    assert predicted.shape == (5, 8)
    assert kept.joined and feedback_id in store
    assert store.nbytes == ENTRY_OVERHEAD_BYTES
    with pytest.raises(KeyError):
        store.settle(feedback_id)


def test_entries_share_member_name_tuples() -> None:
    store = AnswerStore()
    first = store.get(store.remember(Answered.of("e", "p", tuple(MEMBERS), answers(1))))
    second = store.get(store.remember(Answered.of("e", "p", tuple(list(MEMBERS)), answers(1))))
    assert first is not None and second is not None
    assert first.asked is second.asked and first.members is second.members


@pytest.mark.parametrize("batch", [1, 1024])
def test_the_byte_estimate_is_never_below_what_the_entries_really_take(batch: int) -> None:
    given = answers(batch)
    store = AnswerStore(capacity=100_000, max_bytes=1 << 40)
    count = 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            store.remember(Answered.of("digits", "default", tuple(MEMBERS), given))
        gc.collect()
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert measured <= store.nbytes
    assert store.nbytes <= 1.5 * measured  # and not a loose guess either


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        AnswerStore(capacity=0)
    with pytest.raises(ValueError):
        AnswerStore(max_bytes=10)
