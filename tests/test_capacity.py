"""Per-expert capacity: reassignment to the next-best expert and overflow to dense."""

import numpy as np
import pytest

from router.capacity import CapacityTracker, assign_with_capacity


def test_everything_fits_unchanged():
    order = np.array([[0, 1, 2], [1, 0, 2]])
    mask = np.array([[True, False, False], [True, True, False]])

    result = assign_with_capacity(order, mask, [5, 5, 5])

    assert (result.mask == mask).all()
    assert not result.overflow.any()
    assert result.moved == 0


def test_full_expert_moves_row_to_next_best():
    order = np.array([[0, 2, 1], [0, 2, 1]])
    mask = np.array([[True, False, False], [True, False, False]])

    result = assign_with_capacity(order, mask, [1, 5, 5])

    assert result.mask.tolist() == [[True, False, False], [False, False, True]]
    assert result.moved == 1


def test_no_free_expert_overflows_to_dense():
    order = np.array([[0, 1], [0, 1]])
    mask = np.array([[True, False], [True, False]])

    result = assign_with_capacity(order, mask, [1, 0])

    assert result.overflow.tolist() == [False, True]
    assert result.mask.tolist() == [[True, False], [False, False]]


def test_two_expert_row_keeps_free_one_and_replaces_full_one():
    order = np.array([[0, 1, 2]])
    mask = np.array([[True, True, False]])

    result = assign_with_capacity(order, mask, [1, 0, 1])

    assert result.mask.tolist() == [[True, False, True]]


def test_tracker_acquire_and_release():
    tracker = CapacityTracker([2, 1])

    tracker.acquire(np.array([2, 1]))

    assert tracker.free_slots().tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        tracker.acquire(np.array([1, 0]))
    tracker.release(np.array([2, 1]))
    assert tracker.free_slots().tolist() == [2, 1]
