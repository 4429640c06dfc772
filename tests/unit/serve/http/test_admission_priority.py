"""Admission by traffic class: live headroom, live ahead in line, bulk shed first, bulk's minimum share."""

from __future__ import annotations

import asyncio

import pytest

from serve.http.admission import AdmissionGate, Cost, Shed
from shared.messages import Priority

LIVE, BULK = Priority.LIVE, Priority.BULK


def _gate(**kwargs) -> AdmissionGate:  # noqa: ANN003 - AdmissionGate's keywords
    options = {
        "max_wait_s": 5.0,
        "max_waiting": 8,
        "bulk_min_share": 0.2,
        "live_headroom": 0.3,
    } | kwargs
    return AdmissionGate(10, 10_000, **options)


def test_bulk_stops_short_of_the_live_headroom_and_live_gets_in_at_once() -> None:
    async def run() -> None:
        gate = _gate(max_wait_s=0)
        await gate.admit(Cost(7, 0), priority=BULK)
        with pytest.raises(Shed, match=r"overloaded \(bulk\)"):
            await gate.admit(Cost(1, 0), priority=BULK)
        await gate.admit(Cost(3, 0), priority=LIVE)  # the headroom is there
        assert gate.held == Cost(10, 0)
        assert gate.snapshot()["classes"]["bulk"]["shed_inputs"] == 1

    asyncio.run(run())


def test_a_waiting_live_call_goes_ahead_of_bulk_calls_that_came_first() -> None:
    async def run() -> None:
        gate = _gate()
        running = await gate.admit(Cost(10, 0), priority=LIVE)
        bulk = asyncio.ensure_future(gate.admit(Cost(5, 0), priority=BULK))
        await asyncio.sleep(0)
        live = asyncio.ensure_future(gate.admit(Cost(5, 0), priority=LIVE))
        await asyncio.sleep(0)
        running.adjust(Cost(3, 0))  # room for one of them (bulk's share of 2 stays free)
        await asyncio.sleep(0.01)
        assert live.done() and not bulk.done()
        running.release()
        (await live).release()
        (await bulk).release()

    asyncio.run(run())


def test_a_bulk_call_never_slips_past_a_waiting_live_call() -> None:
    async def run() -> None:
        gate = _gate()
        await gate.admit(Cost(6, 0), priority=BULK)
        live = asyncio.ensure_future(gate.admit(Cost(5, 0), priority=LIVE))  # 11 > 10: waits
        await asyncio.sleep(0)
        bulk = asyncio.ensure_future(gate.admit(Cost(1, 0), priority=BULK))  # would fit 7
        await asyncio.sleep(0)
        assert not bulk.done(), "bulk went ahead of the waiting live call"
        live.cancel()
        bulk.cancel()
        await asyncio.gather(live, bulk, return_exceptions=True)

    asyncio.run(run())


def test_a_live_call_on_a_full_line_pushes_out_the_newest_bulk_call() -> None:
    async def run() -> None:
        gate = _gate(max_waiting=2)
        await gate.admit(Cost(10, 0), priority=LIVE)
        older = asyncio.ensure_future(gate.admit(Cost(1, 0), priority=BULK))
        newer = asyncio.ensure_future(gate.admit(Cost(1, 0), priority=BULK))
        await asyncio.sleep(0)
        live = asyncio.ensure_future(gate.admit(Cost(1, 0), priority=LIVE))
        await asyncio.sleep(0)
        with pytest.raises(Shed, match="pushed out of the line by live work"):
            await newer
        assert not older.done() and not live.done()
        with pytest.raises(Shed, match=r"overloaded \(bulk\)"):  # a full line sheds bulk itself
            await gate.admit(Cost(1, 0), priority=BULK)
        classes = gate.snapshot()["classes"]
        assert classes["live"]["shed_inputs"] == 0 and classes["bulk"]["shed_inputs"] == 2
        older.cancel()
        live.cancel()
        await asyncio.gather(older, live, return_exceptions=True)

    asyncio.run(run())


def test_live_is_shed_only_when_the_line_holds_no_bulk_call() -> None:
    async def run() -> None:
        gate = _gate(max_waiting=1)
        await gate.admit(Cost(10, 0), priority=LIVE)
        waiting = asyncio.ensure_future(gate.admit(Cost(1, 0), priority=LIVE))
        await asyncio.sleep(0)
        with pytest.raises(Shed, match=r"overloaded \(live\)"):
            await gate.admit(Cost(1, 0), priority=LIVE)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    asyncio.run(run())


def test_live_leaves_bulk_its_minimum_share_while_bulk_waits() -> None:
    async def run() -> None:
        gate = _gate()
        await gate.admit(Cost(1, 0), priority=LIVE)
        await gate.admit(Cost(6, 0), priority=BULK)  # 7 held: the bulk limit
        small_bulk = await gate.admit(Cost(0, 0), priority=BULK)
        small_bulk.release()
        first = await gate.admit(Cost(2, 0), priority=LIVE)  # 9 held, live 3
        first.release()  # 7 held
        # Bulk waits (the bulk limit is reached, and it holds more than its share) ...
        bulk = asyncio.ensure_future(gate.admit(Cost(2, 0), priority=BULK))
        await asyncio.sleep(0)
        assert not bulk.done()
        # ... but bulk holds 6 >= its share of 2, so live may still take the rest.
        await gate.admit(Cost(3, 0), priority=LIVE)
        bulk.cancel()
        await asyncio.gather(bulk, return_exceptions=True)

    asyncio.run(run())


def test_bulk_below_its_share_gets_in_even_when_live_holds_past_the_bulk_limit() -> None:
    async def run() -> None:
        gate = _gate()
        await gate.admit(Cost(8, 0), priority=LIVE)  # past the bulk limit of 7
        bulk = await gate.admit(Cost(2, 0), priority=BULK)  # within bulk's own share of 2
        assert gate.held == Cost(10, 0)
        bulk.release()
        # With bulk waiting below its share, live may not fill bulk's share.
        live = await gate.admit(Cost(0, 0), priority=LIVE)
        live.release()

    asyncio.run(run())


def test_live_may_not_take_bulks_share_while_bulk_waits_below_it() -> None:
    async def run() -> None:
        gate = _gate()
        held = await gate.admit(Cost(8, 0), priority=LIVE)
        other = await gate.admit(Cost(2, 0), priority=LIVE)  # no bulk around: live takes all
        bulk = asyncio.ensure_future(gate.admit(Cost(2, 0), priority=BULK))
        await asyncio.sleep(0)
        other.release()  # 2 free: bulk's share, and bulk waits for it
        await asyncio.sleep(0.01)
        assert bulk.done()
        (await bulk).release()
        held.release()

    asyncio.run(run())
