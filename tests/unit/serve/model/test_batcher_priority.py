"""The batch queue's two classes: live first, bulk's minimum share, bulk shed before live."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from serve.model import batcher
from serve.model.batcher import BatchQueue, Overloaded
from shared.messages import Priority

LIVE, BULK = Priority.LIVE, Priority.BULK


class Engine:
    """Records each batch; the first batch is held at a gate so that the queue fills behind it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, batch: list[str]) -> Sequence[str]:
        self.batches.append(list(batch))
        self.started.set()
        await self.gate.wait()
        return batch


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


def _submit(
    queue: BatchQueue, name: str, count: int, priority: Priority, express: bool = False
) -> list[asyncio.Future]:
    """``count`` items named ``name0``, ``name1`` ... submitted at once in class ``priority``."""
    return [
        asyncio.ensure_future(queue.submit(f"{name}{i}", priority=priority, express=express))
        for i in range(count)
    ]


async def _hold_first_batch(queue: BatchQueue, engine: Engine) -> asyncio.Future:
    first = asyncio.ensure_future(queue.submit("first", priority=BULK))
    await engine.started.wait()
    return first


def test_live_items_are_batched_before_bulk_items_that_came_first() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(
            engine, max_batch_size=4, max_wait_s=0.0, capacity=64, bulk_min_share=0.0, bulk_batch_while_live=1.0
        )
        first = await _hold_first_batch(queue, engine)
        calls = _submit(queue, "b", 6, BULK)
        calls += _submit(queue, "l", 2, LIVE)
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(first, *calls)
        # The live items jump the six bulk items queued before them; bulk fills the rest.
        assert engine.batches[1] == ["l0", "l1", "b0", "b1"]
        assert engine.batches[2] == ["b2", "b3", "b4", "b5"]

    _run(test)


def test_bulk_keeps_its_minimum_share_under_a_flood_of_live_items() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(
            engine, max_batch_size=10, max_wait_s=0.0, capacity=400, bulk_min_share=0.2
        )
        first = await _hold_first_batch(queue, engine)
        bulk = _submit(queue, "b", 150, BULK)
        live = _submit(queue, "l", 200, LIVE)
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(first, *bulk, *live)
        # While live items could fill every batch, bulk still got its fifth of the slots.
        flooded = [b for b in engine.batches[1:] if any(x.startswith("l") for x in b)][:-1]
        slots = sum(len(b) for b in flooded)
        bulk_slots = sum(x.startswith("b") for b in flooded for x in b)
        assert bulk_slots == pytest.approx(0.2 * slots, abs=2)

    _run(test)


def test_without_a_share_bulk_waits_while_live_items_fill_the_batches() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(
            engine, max_batch_size=4, max_wait_s=0.0, capacity=64, bulk_min_share=0.0, bulk_batch_while_live=1.0
        )
        first = await _hold_first_batch(queue, engine)
        bulk = _submit(queue, "b", 2, BULK)
        live = _submit(queue, "l", 8, LIVE)
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(first, *bulk, *live)
        assert engine.batches[1:] == [
            ["l0", "l1", "l2", "l3"],
            ["l4", "l5", "l6", "l7"],
            ["b0", "b1"],
        ]

    _run(test)


def test_bulk_may_not_fill_the_live_headroom() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=2, max_wait_s=0.0, capacity=8, live_headroom=0.25)
        first = await _hold_first_batch(queue, engine)
        bulk = _submit(queue, "b", 6, BULK)
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="bulk capacity 6 of 8"):
            await queue.submit("b6", priority=BULK)
        live = _submit(queue, "l", 2, LIVE)
        await asyncio.sleep(0)
        assert queue.depth_of(LIVE) == 2 and queue.depth_of(BULK) == 6
        engine.gate.set()
        await asyncio.gather(first, *bulk, *live)

    _run(test)


def test_a_live_item_on_a_full_queue_pushes_out_the_newest_bulk_item() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=2, max_wait_s=0.0, capacity=4, live_headroom=0.0)
        first = await _hold_first_batch(queue, engine)
        bulk = _submit(queue, "b", 4, BULK)
        await asyncio.sleep(0)
        live = asyncio.ensure_future(queue.submit("l0", priority=LIVE))
        await asyncio.sleep(0.01)
        assert bulk[3].done()
        with pytest.raises(Overloaded, match="shed for live work"):
            bulk[3].result()
        engine.gate.set()
        assert await live == "l0"
        assert [await b for b in bulk[:3]] == ["b0", "b1", "b2"]
        await first

    _run(test)


def test_a_live_item_is_refused_only_when_no_bulk_is_left_to_shed() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=2, max_wait_s=0.0, capacity=2)
        first = await _hold_first_batch(queue, engine)
        live = _submit(queue, "l", 2, LIVE)
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="batch queue full"):
            await queue.submit("l2", priority=LIVE)
        engine.gate.set()
        await asyncio.gather(first, *live)

    _run(test)


def test_batches_stay_short_while_live_work_arrives_and_fill_again_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=8, max_wait_s=0.0, capacity=64, bulk_batch_while_live=0.25)
        first = await _hold_first_batch(queue, engine)
        bulk = _submit(queue, "b", 12, BULK)
        live = asyncio.ensure_future(queue.submit("l0", priority=LIVE))
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(first, live, *bulk)
        # The live item's batch, and the bulk batches after it, carry 2 (a quarter of 8).
        assert engine.batches[1] == ["l0", "b0"]
        assert [len(b) for b in engine.batches[2:]] == [2, 2, 2, 2, 2, 1]  # the 11 bulk items left
        monkeypatch.setattr(batcher, "LIVE_ACTIVE_S", 0.0)  # live work has stopped arriving
        engine.gate.clear()
        engine.started.clear()
        held = asyncio.ensure_future(queue.submit("held", priority=BULK))
        await engine.started.wait()
        more = _submit(queue, "c", 8, BULK)
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(held, *more)
        assert engine.batches[-1] == [f"c{i}" for i in range(8)]

    _run(test)


@pytest.mark.parametrize("field", ["bulk_min_share", "live_headroom", "bulk_batch_while_live"])
def test_shares_outside_zero_to_one_are_refused_by_name(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be between 0 and 1, got 1.5"):
        BatchQueue(Engine(), 2, 0.0, 8, **{field: 1.5})


def test_express_items_run_next_in_a_batch_of_their_own() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=64, bulk_min_share=0.0)
        first = await _hold_first_batch(queue, engine)
        calls = _submit(queue, "l", 6, LIVE)
        calls += _submit(queue, "x", 2, LIVE, express=True)
        await asyncio.sleep(0)
        assert queue.depth_of(LIVE) == 8 and queue.depth == 8
        engine.gate.set()
        await asyncio.gather(first, *calls)
        # The express items arrived last and run next, alone: not topped up with the live items.
        assert engine.batches[1:] == [["x0", "x1"], ["l0", "l1", "l2", "l3"], ["l4", "l5"]]

    _run(test)


def test_an_express_batch_still_carries_the_bulk_items_owed() -> None:
    class Stepped(Engine):
        """Each batch waits for its own release."""

        def __init__(self) -> None:
            super().__init__()
            self.steps = asyncio.Semaphore(0)

        async def __call__(self, batch: list[str]) -> Sequence[str]:
            self.batches.append(list(batch))
            self.started.set()
            await self.steps.acquire()
            return batch

    async def formed(engine: Stepped, count: int) -> None:
        while len(engine.batches) < count:
            await asyncio.sleep(0)

    async def test() -> None:
        engine = Stepped()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=64, bulk_min_share=0.5)
        first = await _hold_first_batch(queue, engine)
        calls = _submit(queue, "b", 4, BULK)
        calls += _submit(queue, "l", 8, LIVE)
        await asyncio.sleep(0)
        engine.steps.release()
        await formed(engine, 2)  # l0..l3 run; bulk is owed two slots of the next batch
        calls.append(asyncio.ensure_future(queue.submit("x0", priority=LIVE, express=True)))
        await asyncio.sleep(0)
        for _ in range(4):
            engine.steps.release()
        await asyncio.gather(first, *calls)
        # The express item goes ahead of l4..l7, alone but for the bulk items owed: a
        # flood of express items slows a backfill, never stops it.
        assert engine.batches[1:] == [
            ["l0", "l1", "l2", "l3"], ["x0", "b0", "b1"], ["l4", "l5", "l6", "b2"], ["l7", "b3"]
        ]

    _run(test)


def test_an_express_bulk_item_is_queued_as_any_bulk_item() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=64, bulk_min_share=0.0)
        first = await _hold_first_batch(queue, engine)
        calls = [asyncio.ensure_future(queue.submit("b", priority=BULK, express=True))]
        calls += [asyncio.ensure_future(queue.submit("l", priority=LIVE))]
        await asyncio.sleep(0)
        assert queue.depth_of(BULK) == 1
        engine.gate.set()
        await asyncio.gather(first, *calls)
        assert engine.batches[1:] == [["l"], ["b"]]  # after the live item, as before

    _run(test)


def test_closing_fails_queued_express_items() -> None:
    async def test() -> None:
        engine = Engine()
        queue = BatchQueue(engine, max_batch_size=4, max_wait_s=0.0, capacity=64)
        first = await _hold_first_batch(queue, engine)
        express = asyncio.ensure_future(queue.submit("x", priority=LIVE, express=True))
        await asyncio.sleep(0)
        await queue.close()
        with pytest.raises(batcher.DeadlineExceeded, match="shutting down"):
            await express
        first.cancel()

    _run(test)
