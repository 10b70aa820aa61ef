"""Load-sized batching: an idle batcher sends at once, a busy one groups arrivals."""

import asyncio

import pytest

from services.batcher import AdaptiveBatcher


class Recorder:
    def __init__(self, delay_s=0.0, fail=False):
        self.batches = []
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("batch failed")
        return [item * 10 for item in items]


async def test_idle_batcher_sends_lone_request_at_once():
    process = Recorder()
    batcher = AdaptiveBatcher(process, max_batch_size=8)

    result = await asyncio.wait_for(batcher.submit(1), timeout=0.5)

    assert result == 10
    assert process.batches == [[1]]


async def submit_after_first(batcher, count):
    """Submit item 0, then items 1..count-1 while item 0's batch runs."""
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, count)]
    return await asyncio.gather(first, *rest)


async def test_arrivals_during_a_batch_form_the_next_one():
    process = Recorder(delay_s=0.05)
    batcher = AdaptiveBatcher(process, max_batch_size=8)

    results = await submit_after_first(batcher, 5)

    assert results == [0, 10, 20, 30, 40]
    assert process.batches == [[0], [1, 2, 3, 4]]
    assert batcher.mean_batch_size == 2.5


async def test_batches_capped_at_max_size():
    process = Recorder(delay_s=0.05)
    batcher = AdaptiveBatcher(process, max_batch_size=2)

    await submit_after_first(batcher, 6)

    assert [len(batch) for batch in process.batches] == [1, 2, 2, 1]


async def test_concurrent_batch_slots():
    process = Recorder(delay_s=0.05)
    batcher = AdaptiveBatcher(process, max_batch_size=8, max_concurrent_batches=2)

    await submit_after_first(batcher, 5)

    assert process.batches == [[0], [1, 2, 3, 4]]
    assert batcher.batches == 2


async def test_failure_reaches_every_caller_of_the_batch():
    batcher = AdaptiveBatcher(Recorder(fail=True), max_batch_size=4)

    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert all(isinstance(result, RuntimeError) for result in results)


async def test_fill_wait_groups_arrivals_under_load():
    process = Recorder()
    batcher = AdaptiveBatcher(process, max_batch_size=8, fill_wait_s=0.05)
    await asyncio.gather(batcher.submit(0), batcher.submit(1))  # a batch of two: under load

    first = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.submit(3))
    await asyncio.gather(first, second)

    assert process.batches == [[0, 1], [2, 3]]


async def test_idle_batcher_skips_fill_wait():
    process = Recorder()
    batcher = AdaptiveBatcher(process, max_batch_size=8, fill_wait_s=5.0)

    result = await asyncio.wait_for(batcher.submit(1), timeout=0.5)

    assert result == 10


def test_rejects_zero_sizes():
    with pytest.raises(ValueError, match="must be at least 1"):
        AdaptiveBatcher(Recorder(), max_batch_size=0)
