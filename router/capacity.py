"""Per-expert capacity: rows in flight per expert, and reassignment when one is full.

A hot expert must not queue the whole service. The router reserves a slot per row and
expert before calling it and releases the slots when the call returns; a row whose
chosen expert is full moves to its next-best free expert, and a row for which no free
expert is left goes to the dense model (reason `capacity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CapacityAssignment", "CapacityTracker", "assign_with_capacity"]


@dataclass(frozen=True)
class CapacityAssignment:
    """Result of fitting a batch's choices into the free slots."""

    mask: np.ndarray  # [N, E] bool: experts each row will call
    overflow: np.ndarray  # [N] bool: rows that found no free expert and go to dense
    moved: int  # rows that were moved to a lower-ranked expert


def assign_with_capacity(order: np.ndarray, mask: np.ndarray, free_slots: Sequence[int]) -> CapacityAssignment:
    """Fit each row's chosen experts into `free_slots`, row by row in batch order.

    Args:
        order: [N, E] expert ids by descending gate probability per row.
        mask: [N, E] bool, the experts the policy chose (before capacity).
        free_slots: free row slots per expert.

    A row keeps its chosen experts while they have room. A full one is replaced by the
    highest-ranked unchosen expert with room; if none has room the row overflows and
    none of its slots is taken.
    """
    num_rows, num_experts = mask.shape
    free = np.asarray(free_slots, dtype=np.int64).copy()
    demand = mask.sum(axis=0)
    if (demand <= free).all():  # Common case: everything fits.
        return CapacityAssignment(mask=mask.copy(), overflow=np.zeros(num_rows, dtype=bool), moved=0)

    result = np.zeros_like(mask)
    overflow = np.zeros(num_rows, dtype=bool)
    moved = 0
    for row in range(num_rows):
        chosen = [int(e) for e in order[row] if mask[row, e]]
        if not chosen:
            continue
        kept = [e for e in chosen if free[e] > 0]
        if len(kept) < len(chosen):
            spares = [int(e) for e in order[row] if not mask[row, e] and free[e] > 0]
            kept += spares[: len(chosen) - len(kept)]
            if len(kept) < len(chosen):
                overflow[row] = True
                continue
            moved += 1
        for expert in kept:
            free[expert] -= 1
            result[row, expert] = True
    return CapacityAssignment(mask=result, overflow=overflow, moved=moved)


class CapacityTracker:
    """Rows in flight per expert, against a fixed capacity per expert.

    Not thread-safe: one asyncio event loop (a router replica) owns it.
    """

    def __init__(self, capacities: Sequence[int]) -> None:
        if any(c < 1 for c in capacities):
            raise ValueError(f"every expert capacity must be at least 1, got {list(capacities)}")
        self.capacities = np.asarray(capacities, dtype=np.int64)
        self.in_flight = np.zeros(len(capacities), dtype=np.int64)

    def free_slots(self) -> np.ndarray:
        return self.capacities - self.in_flight

    def acquire(self, rows_per_expert: np.ndarray) -> None:
        """Reserve slots; raises if that would exceed a capacity (a caller bug)."""
        after = self.in_flight + rows_per_expert
        if (after > self.capacities).any():
            raise RuntimeError(f"capacity exceeded: in flight {after.tolist()}, capacity {self.capacities.tolist()}")
        self.in_flight = after

    def release(self, rows_per_expert: np.ndarray) -> None:
        self.in_flight = np.maximum(self.in_flight - rows_per_expert, 0)
