"""Storage slots: at most the limit at once, slots that free up go to the calls in turn."""

from __future__ import annotations

import asyncio

import pytest

from serve.http.fair_slots import FairSlots


class Line:
    """Callers of ``slots`` that note their name when they get a slot and hold it until ``release``."""

    def __init__(self, limit: int) -> None:
        self.slots = FairSlots(limit)
        self.order: list[str] = []
        self.release = asyncio.Event()

    async def _hold(self, call: str, name: str) -> None:
        async with self.slots.turn(call):
            self.order.append(name)
            await self.release.wait()

    def hold(self, call: str, name: str | None = None) -> asyncio.Future[None]:
        """A caller of ``call`` (named ``name``, else ``call``) asking for a slot, as a task."""
        return asyncio.ensure_future(self._hold(call, name or call))


def test_a_call_of_one_request_gets_the_next_free_slot_behind_a_call_of_many() -> None:
    async def run() -> list[str]:
        line = Line(2)
        tasks = [line.hold("many", f"many{i}") for i in range(6)]
        await asyncio.sleep(0)
        tasks.append(line.hold("one"))
        await asyncio.sleep(0)
        assert line.order == ["many0", "many1"] and line.slots.held == 2 and line.slots.waiting == 5
        line.release.set()
        await asyncio.gather(*tasks)
        assert line.slots.held == 0 and line.slots.waiting == 0
        return line.order

    assert asyncio.run(run()) == ["many0", "many1", "many2", "one", "many3", "many4", "many5"]


def test_a_caller_that_goes_away_while_waiting_leaves_the_line() -> None:
    async def run() -> None:
        line = Line(1)
        holder = line.hold("a")
        await asyncio.sleep(0)
        gone = line.hold("b")
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert line.slots.waiting == 0
        line.release.set()
        await holder
        await line.hold("c")  # the slot came back
        assert line.order == ["a", "c"] and line.slots.held == 0

    asyncio.run(run())


def test_a_slot_granted_to_a_caller_that_went_away_is_passed_on() -> None:
    async def run() -> None:
        line = Line(1)
        waiters: list[asyncio.Future[None]] = []

        async def holder() -> None:
            async with line.slots.turn("a"):
                line.order.append("a")
                await line.release.wait()
            waiters[0].cancel()  # b was granted the slot on the way out; it goes away before it runs

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiters.append(line.hold("b"))
        after = line.hold("c")
        await asyncio.sleep(0)
        line.release.set()
        await asyncio.gather(first, waiters[0], after, return_exceptions=True)
        assert line.order == ["a", "c"] and line.slots.held == 0 and waiters[0].cancelled()

    asyncio.run(run())


def test_a_slot_freed_between_a_waiters_cancellation_and_its_exit_goes_to_the_next_caller() -> None:
    """Cancelling a waiting task cancels its grant at once; the task leaves the line only when it
    next runs. A slot released in between skips that grant and goes to the caller behind it."""

    async def run() -> None:
        line = Line(1)
        holder = line.hold("a")
        await asyncio.sleep(0)
        gone = line.hold("b")
        behind = line.hold("c")
        await asyncio.sleep(0)
        assert line.slots.waiting == 2
        line.release.set()  # a runs first, then b: ...
        gone.cancel()  # ... whose grant is cancelled now, while it is still in the line
        await asyncio.gather(holder, behind)  # a's release passes over b's grant to c
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert line.order == ["a", "c"] and line.slots.held == 0 and line.slots.waiting == 0

    asyncio.run(asyncio.wait_for(run(), 5))


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        FairSlots(0)
