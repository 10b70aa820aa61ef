"""Load-sized batching of concurrent calls, for the router.

`serve.batch` waits a fixed window for a batch to fill: a short window leaves batches
small under load (one expert call per few requests), a long one delays every request
at low load. `AdaptiveBatcher` sizes batches by the load instead. A batch starts as
soon as one of `max_concurrent_batches` slots is free, so a lone request on an idle
router goes at once. Requests that arrive while the slots are busy queue up and leave
together, up to `max_batch_size`, when a slot frees. Under load, batches grow to about
the number of requests that arrive during one batch's round trip. With `fill_wait_s`
> 0, a batch under load (the previous batch held more than one call) waits that long
for more calls before it leaves; a lone caller on an idle router never waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["AdaptiveBatcher"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class AdaptiveBatcher(Generic[Item, Result]):
    """Groups concurrent `submit` calls into batches for `process`.

    `process` receives a list of items and must return one result per item, in order.
    If it raises, every call of that batch raises the same exception. Not thread-safe:
    use it from one event loop.
    """

    def __init__(self, process: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch_size: int,
                 max_concurrent_batches: int = 1, fill_wait_s: float = 0.0) -> None:
        if max_batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_concurrent_batches "
                             f"({max_concurrent_batches}) must be at least 1")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.fill_wait_s = fill_wait_s
        self._queue: deque[tuple[Item, asyncio.Future]] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0
        self.items = 0
        self._last_batch_size = 0

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._queue and self._running < self.max_concurrent_batches:
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run_batch())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self) -> None:
        try:
            under_load = self._last_batch_size > 1
            if self.fill_wait_s > 0 and under_load and len(self._queue) < self.max_batch_size:
                await asyncio.sleep(self.fill_wait_s)
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            if not batch:
                return
            self._last_batch_size = len(batch)
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self.process([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - delivered to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                return
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._running -= 1
            self._start_batches()
