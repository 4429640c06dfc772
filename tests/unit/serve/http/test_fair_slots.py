"""Storage slots: at most the limit at once, slots that free up go to the calls in turn."""

from __future__ import annotations

import asyncio

import pytest

from serve.http.fair_slots import FairSlots


async def _hold(slots: FairSlots, call: str, name: str, order: list[str], release: asyncio.Event) -> None:
    async with slots.turn(call):
        order.append(name)
        await release.wait()


def test_a_call_of_one_request_gets_the_next_free_slot_behind_a_call_of_many() -> None:
    async def run() -> list[str]:
        slots = FairSlots(2)
        order: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.ensure_future(_hold(slots, "many", f"many{i}", order, release)) for i in range(6)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(_hold(slots, "one", "one", order, release)))
        await asyncio.sleep(0)
        assert order == ["many0", "many1"] and slots.held == 2 and slots.waiting == 5
        release.set()
        await asyncio.gather(*tasks)
        assert slots.held == 0 and slots.waiting == 0
        return order

    assert asyncio.run(run()) == ["many0", "many1", "many2", "one", "many3", "many4", "many5"]


def test_a_caller_that_goes_away_while_waiting_leaves_the_line() -> None:
    async def run() -> None:
        slots = FairSlots(1)
        order: list[str] = []
        release = asyncio.Event()
        holder = asyncio.ensure_future(_hold(slots, "a", "a", order, release))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(_hold(slots, "b", "b", order, release))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert slots.waiting == 0
        release.set()
        await holder
        await _hold(slots, "c", "c", order, release)  # the slot came back
        assert order == ["a", "c"] and slots.held == 0

    asyncio.run(run())


def test_a_slot_granted_to_a_caller_that_went_away_is_passed_on() -> None:
    async def run() -> None:
        slots = FairSlots(1)
        order: list[str] = []
        release = asyncio.Event()
        waiters: list[asyncio.Future[None]] = []

        async def holder() -> None:
            async with slots.turn("a"):
                order.append("a")
                await release.wait()
            waiters[0].cancel()  # b was granted the slot on the way out; it goes away before it runs

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiters.append(asyncio.ensure_future(_hold(slots, "b", "b", order, release)))
        after = asyncio.ensure_future(_hold(slots, "c", "c", order, release))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, waiters[0], after, return_exceptions=True)
        assert order == ["a", "c"] and slots.held == 0 and waiters[0].cancelled()

    asyncio.run(run())


def test_a_slot_freed_between_a_waiters_cancellation_and_its_exit_goes_to_the_next_caller() -> None:
    """Cancelling a waiting task cancels its grant at once; the task leaves the line only when it
    next runs. A slot released in between skips that grant and goes to the caller behind it."""

    async def run() -> None:
        slots = FairSlots(1)
        order: list[str] = []
        release = asyncio.Event()
        holder = asyncio.ensure_future(_hold(slots, "a", "a", order, release))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(_hold(slots, "b", "b", order, release))
        behind = asyncio.ensure_future(_hold(slots, "c", "c", order, release))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        release.set()  # a runs first, then b: ...
        gone.cancel()  # ... whose grant is cancelled now, while it is still in the line
        await asyncio.gather(holder, behind)  # a's release passes over b's grant to c
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert order == ["a", "c"] and slots.held == 0 and slots.waiting == 0

    asyncio.run(asyncio.wait_for(run(), 5))


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        FairSlots(0)
