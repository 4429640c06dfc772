"""Merging concurrent model calls: answers go back to their callers, in order."""

from __future__ import annotations

import asyncio

import pytest

from serve.model.coalescer import CallCoalescer


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[int], float | None]] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def send(self, items: list[int], deadline: float | None) -> list[int]:
        self.calls.append((list(items), deadline))
        await self.release.wait()
        if self.fail:
            raise ConnectionError("replica gone")
        return [i * 10 for i in items]


def test_a_lone_call_is_sent_at_once() -> None:
    async def run() -> None:
        rec = Recorder()
        rec.release.set()
        coalescer = CallCoalescer(rec.send, max_in_flight=2)
        assert await coalescer.call([1, 2], 5.0) == [10, 20]
        assert rec.calls == [([1, 2], 5.0)]

    asyncio.run(run())


def test_callers_beyond_the_in_flight_limit_are_merged_and_answered_in_order() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1)
        first = asyncio.ensure_future(coalescer.call([1], 1.0))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(coalescer.call([n, n + 1], float(n))) for n in (2, 4, 6)]
        await asyncio.sleep(0)
        rec.release.set()
        assert await first == [10]
        assert [await r for r in rest] == [[20, 30], [40, 50], [60, 70]]
        # One call for the first caller, one merged call for the three that waited,
        # carrying the latest of their deadlines.
        assert rec.calls == [([1], 1.0), ([2, 3, 4, 5, 6, 7], 6.0)]

    asyncio.run(run())


def test_a_merged_call_respects_max_items() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=3)
        calls = [asyncio.ensure_future(coalescer.call([n, n], None)) for n in range(4)]
        await asyncio.sleep(0)
        rec.release.set()
        assert [await c for c in calls] == [[n * 10, n * 10] for n in range(4)]
        assert [len(items) for items, _ in rec.calls] == [2, 2, 2, 2]

    asyncio.run(run())


def test_a_failed_call_fails_every_caller_merged_into_it() -> None:
    async def run() -> None:
        rec = Recorder(fail=True)
        coalescer = CallCoalescer(rec.send, max_in_flight=1)
        calls = [asyncio.ensure_future(coalescer.call([n], None)) for n in range(3)]
        await asyncio.sleep(0)
        rec.release.set()
        for call in calls:
            with pytest.raises(ConnectionError):
                await call
        # The coalescer is still usable afterwards.
        rec.fail = False
        assert await coalescer.call([9], None) == [90]

    asyncio.run(run())


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CallCoalescer(Recorder().send, max_in_flight=0)
