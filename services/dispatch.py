"""Mixture dispatch: from a batch of input rows to combined class probabilities.

`MixtureDispatcher.dispatch` is the router's core, with no HTTP in it:

1. Rows whose request asked for dense, or that the supervisor's traffic split sends to
   dense, skip the gate.
2. The gate scores the other rows; `router.policy.select_experts` picks experts per row
   (top-p within [min_k, max_k]) and sends rows below the confidence floor to dense.
3. `router.capacity.assign_with_capacity` fits the choices into each expert's free
   slots; rows that fit nowhere go to dense (reason `capacity`).
4. Each expert with rows gets ONE call for the whole batch, all experts concurrently,
   each bounded by `expert_timeout_s`.
5. A failed or timed-out expert sends its rows to dense (`expert_error`,
   `expert_timeout`); the other experts' outputs for those rows are dropped.
6. Expert probabilities are combined by the renormalised gate weights. With
   `escalate_below` > 0, a row whose combined top probability stays below it goes to
   dense too (`escalated`); its expert FLOPs still count.
7. One dense call answers every dense row. Only if that call fails too does a request
   fail (`DenseUnavailable`), and then only the requests that had dense rows.

An optional `observer` gets one `ExpertCallRecord` per expert call (for metrics and
logs), and with `forward_request_ids` every expert and dense call also receives the
ids of the requests whose rows it carries, so that model replicas can log them. An
optional `ride_along` source adds rows to the batch's dense call (the shadow
evaluator's pending comparisons), so that they need no call of their own.

Not thread-safe: one replica's event loop owns a dispatcher (capacity counts are local).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from router.capacity import CapacityTracker, assign_with_capacity
from router.gate import Gate
from router.policy import RoutingConfig, needs_escalation, renormalize, select_experts

__all__ = [
    "DenseUnavailable",
    "DispatchItem",
    "ExpertCallRecord",
    "MixtureDispatcher",
    "RouteOutcome",
    "REASON_CODES",
]

# Row-level reasons. `top_p` means the row was answered by experts.
REASON_CODES = ("top_p", "low_confidence", "capacity", "expert_error", "expert_timeout",
                "requested", "supervisor", "router_error", "escalated")
(_TOP_P, _LOW_CONFIDENCE, _CAPACITY, _EXPERT_ERROR, _EXPERT_TIMEOUT, _REQUESTED, _SUPERVISOR, _ROUTER_ERROR,
 _ESCALATED) = range(9)


class DenseUnavailable(RuntimeError):
    """The dense model failed for rows that had no other answer."""


@dataclass(frozen=True)
class DispatchItem:
    """One request's rows and how the caller wants them routed."""

    inputs: np.ndarray  # [n, D] float32
    request_id: str
    force_dense: bool = False  # the client asked for the dense path
    supervisor_dense: bool = False  # the traffic split sends this request to dense


@dataclass
class RouteOutcome:
    """Per-request result of a dispatch, or the error that failed it."""

    outputs: np.ndarray | None = None  # [n, C] float32 class probabilities
    experts: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    row_reasons: list[str] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    gate_scores: list[list[float]] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    flops: int = 0
    error: Exception | None = None

    @property
    def path(self) -> str:
        return "moe" if any(reason == "top_p" for reason in self.row_reasons) else "dense"

    @property
    def reason(self) -> str:
        """The request's reason: the first fallback reason of any row, else `top_p`."""
        for reason in self.row_reasons:
            if reason != "top_p":
                return reason
        return "top_p"


@dataclass(frozen=True)
class ExpertCallRecord:
    """One finished router-to-expert call, as passed to the dispatcher's observer."""

    expert: int
    rows: int
    duration_s: float
    status: str  # "ok", "timeout" or "error"
    error: Exception | None
    request_ids: list[str]  # requests with rows in this call, in batch order


# Both return an awaitable of np.ndarray [n, C]. With `forward_request_ids` they get
# the request ids as one more positional argument: (expert, rows, ids) and (rows, ids).
ExpertCall = Callable[..., Any]
DenseCall = Callable[..., Any]
ExpertCallObserver = Callable[[ExpertCallRecord], None]
# Returns None, or extra rows [m, D] for the next dense call and a function to call once
# with their dense probabilities [m, C] (or with None and the error).
RideAlong = Callable[[], "tuple[np.ndarray, Callable[[np.ndarray | None, Exception | None], None]] | None"]
# Request id under which ride-along rows travel in the dense call.
RIDE_ALONG_ID = "shadow"


class MixtureDispatcher:
    """Routes batches of rows to experts or dense and combines the answers."""

    def __init__(
        self,
        gate: Gate,
        routing: RoutingConfig,
        num_classes: int,
        expert_flops: Sequence[int],
        dense_flops: int,
        call_expert: ExpertCall,
        call_dense: DenseCall,
        expert_capacity: int,
        expert_timeout_s: float,
        dense_timeout_s: float,
        clock: Callable[[], float] = time.perf_counter,
        observer: ExpertCallObserver | None = None,
        forward_request_ids: bool = False,
        ride_along: RideAlong | None = None,
    ) -> None:
        self.gate = gate.eval()
        self.routing = routing
        self.num_experts = gate.spec.num_experts
        self.num_classes = num_classes
        self.gate_flops = gate.flops
        self.expert_flops = np.asarray(expert_flops, dtype=np.int64)
        self.dense_flops = int(dense_flops)
        self.call_expert = call_expert
        self.call_dense = call_dense
        self.capacity = CapacityTracker([expert_capacity] * self.num_experts)
        self.expert_timeout_s = expert_timeout_s
        self.dense_timeout_s = dense_timeout_s
        self.clock = clock
        self.observer = observer
        self.forward_request_ids = forward_request_ids
        self.ride_along = ride_along
        self.last_expert_latency_s: dict[int, float] = {}

    async def dispatch(self, items: Sequence[DispatchItem]) -> list[RouteOutcome]:
        sizes = [len(item.inputs) for item in items]
        x = np.concatenate([item.inputs for item in items]) if len(items) > 1 else items[0].inputs
        x = x.reshape(len(x), -1)  # [R, D]
        num_rows = len(x)
        owner = np.repeat(np.arange(len(items)), sizes)  # [R] request index per row

        # 1. Requests that skip the gate.
        reasons = np.full(num_rows, _TOP_P, dtype=np.int8)
        for index, item in enumerate(items):
            if item.force_dense:
                reasons[owner == index] = _REQUESTED
            elif item.supervisor_dense:
                reasons[owner == index] = _SUPERVISOR
        gated = np.flatnonzero(reasons == _TOP_P)

        # 2-3. Gate, policy and capacity for the gated rows.
        mask = np.zeros((num_rows, self.num_experts), dtype=bool)
        weights = np.zeros((num_rows, self.num_experts), dtype=np.float32)
        scores = np.zeros((num_rows, self.num_experts), dtype=np.float32)
        k = np.zeros(num_rows, dtype=np.int64)
        confidence = np.zeros(num_rows, dtype=np.float32)
        if len(gated):
            try:
                self._select(x[gated], gated, mask, weights, scores, k, confidence, reasons)
            except Exception:  # A gate bug must not fail requests: dense answers them.
                reasons[gated] = _ROUTER_ERROR
                mask[gated] = False

        # 4-6. One concurrent call per expert with rows, then escalation of low-confidence outputs.
        outputs = np.zeros((num_rows, self.num_classes), dtype=np.float32)
        await self._call_experts(items, owner, x, mask, weights, reasons, outputs)
        if self.routing.escalate_below > 0:
            answered = np.flatnonzero(reasons == _TOP_P)
            unsure = needs_escalation(torch.from_numpy(outputs[answered]), self.routing).numpy()
            reasons[answered[unsure]] = _ESCALATED

        # 7. Dense for every row without an expert answer.
        dense_rows = np.flatnonzero(reasons != _TOP_P)
        dense_error: Exception | None = None
        if len(dense_rows):
            dense_error = await self._call_dense_rows(items, owner, x, dense_rows, outputs)

        return self._split(items, sizes, owner, outputs, mask, weights, scores, k, confidence, reasons, dense_error)

    async def _call_dense_rows(self, items, owner, x, dense_rows, outputs) -> Exception | None:
        """Call dense once for `dense_rows` and any ride-along rows, fill `outputs`, and return the error if any."""
        extra = self.ride_along() if self.ride_along is not None else None
        rows_x = x[dense_rows] if extra is None else np.concatenate([x[dense_rows], extra[0]])
        args: tuple = (rows_x,)
        if self.forward_request_ids:
            ids = _request_ids(items, owner[dense_rows])
            args += (ids if extra is None else [*ids, RIDE_ALONG_ID],)
        try:
            dense_probs = await asyncio.wait_for(_awaitable(self.call_dense(*args)), self.dense_timeout_s)
        except BaseException as error:  # noqa: BLE001 - reported per request by the caller
            if extra is not None:
                extra[1](None, error if isinstance(error, Exception) else RuntimeError("dense call cancelled"))
            if isinstance(error, Exception):
                return error
            raise
        outputs[dense_rows] = dense_probs[: len(dense_rows)]
        if extra is not None:
            extra[1](dense_probs[len(dense_rows):], None)
        return None

    @torch.inference_mode()
    def _select(self, rows_x, gated, mask, weights, scores, k, confidence, reasons) -> None:
        probs = torch.softmax(self.gate(torch.from_numpy(rows_x)), dim=-1)  # [G, E]
        selection = select_experts(probs, self.routing)
        assignment = assign_with_capacity(selection.order.numpy(), selection.mask.numpy(),
                                          self.capacity.free_slots())
        final_mask = torch.from_numpy(assignment.mask)
        mask[gated] = assignment.mask
        weights[gated] = renormalize(probs, final_mask).numpy()
        scores[gated] = probs.numpy()
        k[gated] = final_mask.sum(dim=-1).numpy()
        confidence[gated] = selection.confidence.numpy()
        reasons[gated[selection.low_confidence.numpy()]] = _LOW_CONFIDENCE
        reasons[gated[assignment.overflow]] = _CAPACITY

    async def _call_experts(self, items, owner, x, mask, weights, reasons, outputs) -> None:
        """Call every expert with rows once; add weighted answers to `outputs` in place."""
        rows_per_expert = mask.sum(axis=0)
        active = np.flatnonzero(rows_per_expert)
        if not len(active):
            return

        self.capacity.acquire(rows_per_expert)
        try:
            row_sets = [np.flatnonzero(mask[:, expert]) for expert in active]
            request_ids = [_request_ids(items, owner[rows]) for rows in row_sets]
            results = await asyncio.gather(
                *(self._timed_expert_call(int(expert), x[rows], ids)
                  for expert, rows, ids in zip(active, row_sets, request_ids))
            )
        finally:
            self.capacity.release(rows_per_expert)

        for expert, rows, (status, value) in zip(active, row_sets, results):
            if status != "ok":
                failed = rows[reasons[rows] == _TOP_P]
                reasons[failed] = _EXPERT_TIMEOUT if status == "timeout" else _EXPERT_ERROR
                continue
            outputs[rows] += weights[rows, expert, None] * value

    async def _timed_expert_call(self, expert: int, rows_x: np.ndarray, request_ids: list[str]) -> tuple[str, Any]:
        args = (expert, rows_x, request_ids) if self.forward_request_ids else (expert, rows_x)
        started = self.clock()
        status, value = "ok", None
        try:
            value = await asyncio.wait_for(_awaitable(self.call_expert(*args)), self.expert_timeout_s)
        except asyncio.TimeoutError:
            status = "timeout"
        except Exception as error:  # noqa: BLE001 - any expert failure falls back to dense
            status, value = "error", error
        duration_s = self.clock() - started
        self.last_expert_latency_s[expert] = duration_s
        if self.observer is not None:
            self.observer(ExpertCallRecord(expert=expert, rows=len(rows_x), duration_s=duration_s, status=status,
                                           error=value if status == "error" else None, request_ids=request_ids))
        return status, value

    def _split(self, items, sizes, owner, outputs, mask, weights, scores, k, confidence, reasons,
               dense_error) -> list[RouteOutcome]:
        results: list[RouteOutcome] = []
        start = 0
        for index, size in enumerate(sizes):
            rows = slice(start, start + size)
            start += size
            row_reasons = reasons[rows]
            request_mask = mask[rows]
            on_dense = row_reasons != _TOP_P
            if dense_error is not None and on_dense.any():
                results.append(RouteOutcome(error=DenseUnavailable(f"dense model failed: {dense_error!r}")))
                continue
            # Escalated rows ran their experts before the dense call, so they list those experts
            # and pay for both.
            expert_ran = (row_reasons == _TOP_P) | (row_reasons == _ESCALATED)
            experts_per_row = [np.flatnonzero(m).tolist() if ran else [] for m, ran in zip(request_mask, expert_ran)]
            flops = int((request_mask[expert_ran] * self.expert_flops).sum())
            flops += int(on_dense.sum()) * self.dense_flops
            gated_rows = ~np.isin(row_reasons, (_REQUESTED, _SUPERVISOR))
            flops += int(gated_rows.sum()) * self.gate_flops
            results.append(RouteOutcome(
                outputs=outputs[rows],
                experts=experts_per_row,
                weights=[[round(float(weights[row, e]), 6) for e in chosen]
                         for row, chosen in zip(range(rows.start, rows.stop), experts_per_row)],
                row_reasons=[REASON_CODES[r] for r in row_reasons],
                k=[len(chosen) for chosen in experts_per_row],
                gate_scores=np.round(scores[rows], 6).tolist(),
                confidence=np.round(confidence[rows], 6).tolist(),
                flops=flops,
            ))
        return results


def _request_ids(items: Sequence[DispatchItem], owners: np.ndarray) -> list[str]:
    """Ids of the requests that own `owners` (request index per row), once each, in batch order."""
    return [items[index].request_id for index in np.unique(owners)]


async def _awaitable(value):
    return await value
