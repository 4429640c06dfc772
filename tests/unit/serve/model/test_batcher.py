"""The batch queue: batches that fill under load, bounded waiting, deadlines, one result per item."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from serve.model.batcher import BatchQueue, DeadlineExceeded, Overloaded
from shared.errors import TransientError


class Engine:
    """A batch function that records batches and can be held at a gate."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail = fail

    async def __call__(self, batch: list[int]) -> Sequence[int]:
        self.batches.append(list(batch))
        self.started.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in batch]

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    async def occupy(self, queue: BatchQueue, item: int) -> asyncio.Future:
        """Hold the engine and start a lone ``item`` on it: from here the engine is busy."""
        self.hold()
        running = asyncio.ensure_future(queue.submit(item))
        await self.started.wait()
        return running


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


def test_a_lone_item_on_an_idle_queue_is_dispatched_without_waiting() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=8, max_wait_s=2.0, capacity=16)

        started = time.monotonic()
        result = await queue.submit(3)
        elapsed = time.monotonic() - started

        assert result == 30
        assert engine.batches == [[3]]
        assert elapsed < 0.5  # far below max_wait_s
        await queue.close()

    _run(test)


def test_batches_fill_while_the_engine_is_busy() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.05, capacity=32)
        first = await engine.occupy(queue, 0)  # the lone first item runs at once, alone

        rest = [asyncio.ensure_future(queue.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert queue.depth == 10  # waiting while the engine is busy
        engine.gate.set()
        results = await asyncio.gather(first, *rest)

        assert results == [i * 10 for i in range(11)]
        assert engine.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
        assert queue.depth == 0
        await queue.close()

    _run(test)


def test_each_caller_gets_the_result_of_its_own_item() -> None:
    async def test() -> None:
        async def reverse_labels(batch: list[int]) -> list[str]:
            await asyncio.sleep(0)
            return [f"item-{i}" for i in batch]

        queue: BatchQueue[int, str] = BatchQueue(reverse_labels, 3, 0.01, 64)
        items = list(range(20))

        results = await asyncio.gather(*(queue.submit(i) for i in items))

        assert results == [f"item-{i}" for i in items]
        await queue.close()

    _run(test)


def test_a_full_queue_refuses_with_overloaded_and_a_retry_after() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=1, max_wait_s=0.0, capacity=2)
        running = await engine.occupy(queue, 1)
        waiting = [asyncio.ensure_future(queue.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)

        with pytest.raises(Overloaded) as info:
            await queue.submit(4)

        assert isinstance(info.value, TransientError)
        assert info.value.retry_after_s >= 1.0
        assert "capacity 2" in str(info.value)
        engine.gate.set()
        assert await asyncio.gather(running, *waiting) == [10, 20, 30]
        assert 4 not in [i for batch in engine.batches for i in batch]
        assert await queue.submit(5) == 50  # drained: accepted again
        await queue.close()

    _run(test)


def test_retry_after_grows_with_the_queue_and_the_batch_duration() -> None:
    async def test() -> None:
        async def slow(batch: list[int]) -> list[int]:
            await asyncio.sleep(0.1)
            return batch

        queue = BatchQueue(slow, max_batch_size=2, max_wait_s=0.0, capacity=400)
        await queue.submit(1)  # one batch measured: ~0.1 s
        assert queue.retry_after_s() == 1.0  # nothing queued: the floor

        held = [asyncio.ensure_future(queue.submit(i)) for i in range(100)]
        await asyncio.sleep(0)

        # About 50 batches of ~0.1 s queued: well over the floor.
        assert 3.0 < queue.retry_after_s() < 20.0
        await queue.close()
        for future in held:
            future.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    _run(test)


def test_an_item_whose_deadline_passed_while_queued_never_reaches_the_engine() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=8)
        running = await engine.occupy(queue, 1)
        late = asyncio.ensure_future(queue.submit(2, deadline=time.time() + 0.02))
        patient = asyncio.ensure_future(queue.submit(3, deadline=time.time() + 60))
        await asyncio.sleep(0.05)
        engine.gate.set()

        with pytest.raises(DeadlineExceeded):
            await late
        assert await running == 10 and await patient == 30
        assert engine.batches == [[1], [3]]
        await queue.close()

    _run(test)


def test_an_already_expired_item_is_dropped_before_inference() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=8)

        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await queue.submit(7, deadline=time.time() - 1)

        assert engine.batches == []
        await queue.close()

    _run(test)


def test_a_caller_that_went_away_is_not_run() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=8)
        running = await engine.occupy(queue, 1)
        abandoned = asyncio.ensure_future(queue.submit(2))
        kept = asyncio.ensure_future(queue.submit(3))
        await asyncio.sleep(0)
        abandoned.cancel()
        engine.gate.set()

        assert await asyncio.gather(running, kept) == [10, 30]
        assert engine.batches == [[1], [3]]
        await queue.close()

    _run(test)


def test_a_failing_batch_fails_every_waiter_and_the_queue_keeps_serving() -> None:
    async def test() -> None:
        engine = Engine(fail=RuntimeError("engine exploded"))
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=8)
        first = await engine.occupy(queue, 1)
        others = [asyncio.ensure_future(queue.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0)
        engine.gate.set()

        outcomes = await asyncio.gather(first, *others, return_exceptions=True)

        assert [str(o) for o in outcomes] == ["engine exploded"] * 4
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert engine.batches == [[1], [2, 3, 4]]
        engine.fail = None
        assert await queue.submit(5) == 50
        await queue.close()

    _run(test)


def test_a_batch_function_returning_the_wrong_count_fails_its_waiters() -> None:
    async def test() -> None:
        async def short(batch: list[int]) -> list[int]:
            return batch[:-1]

        queue = BatchQueue(short, max_batch_size=4, max_wait_s=0.0, capacity=8)

        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await queue.submit(1)
        await queue.close()

    _run(test)


def test_close_fails_the_items_still_queued() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=1, max_wait_s=0.0, capacity=8)
        await engine.occupy(queue, 1)
        queued = asyncio.ensure_future(queue.submit(2))
        await asyncio.sleep(0)

        await queue.close()

        with pytest.raises(DeadlineExceeded, match="shutting down"):
            await queued
        assert queue.depth == 0
        assert engine.batches == [[1]]

    _run(test)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0.01, 8), "max_batch_size must be >= 1, got 0"),
        ((4, -0.5, 8), "max_wait_s must be >= 0, got -0.5"),
        ((8, 0.01, 4), r"capacity must be >= max_batch_size \(8\), got 4"),
    ],
)
def test_configure_validates_and_names_the_bad_value(args: tuple, message: str) -> None:
    queue = BatchQueue(Engine(), 4, 0.01, 8)

    with pytest.raises(ValueError, match=message):
        queue.configure(*args)
    with pytest.raises(ValueError, match=message):
        BatchQueue(Engine(), *args)

    assert (queue.max_batch_size, queue.max_wait_s, queue.capacity) == (4, 0.01, 8)


def test_configure_changes_the_next_batch() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=16)
        first = await engine.occupy(queue, 0)
        rest = [asyncio.ensure_future(queue.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0)

        queue.configure(max_batch_size=2, max_wait_s=0.0, capacity=16)
        engine.gate.set()
        await asyncio.gather(first, *rest)

        assert engine.batches == [[0], [1, 2], [3, 4], [5, 6]]
        await queue.close()

    _run(test)


def test_close_fails_the_items_of_the_batch_in_flight() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=1, max_wait_s=0.0, capacity=8)
        running = await engine.occupy(queue, 1)

        await queue.close()

        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(running, timeout=1)

    _run(test)
