"""Admission by inputs and bytes: fair turns, a bounded wait, no starvation."""

from __future__ import annotations

import asyncio

import pytest

from serve.http.admission import AdmissionGate, Cost, Shed


def test_calls_within_both_bounds_are_admitted_at_once_and_released() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=10, max_bytes=1000, max_wait_s=0)
        a = await gate.admit(Cost(4, 400))
        b = await gate.admit(Cost(6, 600))
        assert gate.held == Cost(10, 1000)
        a.release()
        b.release()
        b.release()  # twice is harmless
        assert gate.held == Cost(0, 0)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("held", "cost"), [(Cost(10, 400), Cost(1, 1)), (Cost(1, 400), Cost(0, 601))], ids=["by-count", "by-bytes"]
)
def test_a_call_over_either_bound_is_shed_when_it_may_not_wait(held: Cost, cost: Cost) -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=10, max_bytes=1000, max_wait_s=0)
        await gate.admit(held)
        with pytest.raises(Shed, match="limit 10 inputs and 1000 bytes") as info:
            await gate.admit(cost)
        assert info.value.retry_after_s >= 1
        assert gate.held == held

    asyncio.run(run())


def test_a_call_larger_than_the_whole_budget_runs_alone() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=10, max_bytes=100, max_wait_s=1)
        big = await gate.admit(Cost(1, 5000))  # nothing else runs: admitted
        waiting = asyncio.ensure_future(gate.admit(Cost(1, 1)))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        big.release()
        (await waiting).release()

    asyncio.run(run())


def test_a_one_input_call_is_admitted_ahead_of_larger_calls_that_came_first() -> None:
    async def run() -> list[str]:
        gate = AdmissionGate(max_inputs=100, max_bytes=10**9, max_wait_s=10)
        order: list[str] = []
        full = await gate.admit(Cost(100, 0))

        async def call(name: str, inputs: int) -> None:
            ticket = await gate.admit(Cost(inputs, 0))
            order.append(name)
            await asyncio.sleep(0.01)
            ticket.release()

        burst = [asyncio.ensure_future(call(f"burst{i}", 16)) for i in range(16)]
        await asyncio.sleep(0)
        one = asyncio.ensure_future(call("one", 1))
        await asyncio.sleep(0.01)
        assert order == []
        full.adjust(Cost(99, 0))  # one input's worth frees up: it goes to the call due first
        await asyncio.sleep(0.005)
        assert order == ["one"]
        full.release()
        await asyncio.gather(one, *burst)
        return order

    order = asyncio.run(run())
    assert sorted(order[1:]) == sorted(f"burst{i}" for i in range(16))


def test_a_large_call_is_passed_only_until_its_turn_comes_due_and_then_holds_the_line() -> None:
    async def run() -> tuple[int, list[str]]:
        gate = AdmissionGate(max_inputs=100, max_bytes=10**9, max_wait_s=10)
        held = await gate.admit(Cost(50, 0))
        order: list[str] = []

        async def call(name: str, inputs: int) -> None:
            ticket = await gate.admit(Cost(inputs, 0))
            order.append(name)
            ticket.release()

        big = asyncio.ensure_future(call("big", 60))
        await asyncio.sleep(0)
        passed = 0
        while True:  # one-input calls, one after another, each fitting below the bound
            small = asyncio.ensure_future(call("small", 1))
            await asyncio.sleep(0)
            if not small.done():
                break
            passed += 1
            order.clear()
            assert passed < 1000, "the large call's turn never came"
        assert not big.done()
        held.release()  # the head of the line is the large call: it gets in first
        await asyncio.gather(big, small)
        return passed, order

    passed, order = asyncio.run(run())
    # Its share is 0.6 of the budget, a small call's 0.01, and they split what frees up.
    assert 50 <= passed <= 150
    assert order == ["big", "small"]


def test_a_wait_that_runs_out_is_shed_and_lets_the_line_move() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=10, max_bytes=10**9, max_wait_s=0.05)
        held = await gate.admit(Cost(5, 0))
        with pytest.raises(Shed, match="waited"):
            await gate.admit(Cost(10, 0))  # never fits while `held` runs
        assert gate.waiting == 0
        (await gate.admit(Cost(5, 0))).release()  # the line is free again
        held.release()

    asyncio.run(run())


def test_a_full_line_sheds_at_once() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=1, max_bytes=10**9, max_wait_s=10, max_waiting=1)
        held = await gate.admit(Cost(1, 0))
        waiting = asyncio.ensure_future(gate.admit(Cost(1, 0)))
        await asyncio.sleep(0)
        with pytest.raises(Shed, match="1 calls waiting"):
            await gate.admit(Cost(1, 0))
        held.release()
        (await waiting).release()

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_line_and_an_admitted_one_gives_back_its_hold() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=2, max_bytes=10**9, max_wait_s=10)
        held = await gate.admit(Cost(2, 0))
        waiting = asyncio.ensure_future(gate.admit(Cost(2, 0)))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gate.waiting == 0
        held.release()
        assert gate.held == Cost(0, 0)

    asyncio.run(run())


def test_adjusting_a_ticket_to_its_real_cost_lets_waiting_calls_in() -> None:
    async def run() -> None:
        gate = AdmissionGate(max_inputs=10, max_bytes=1000, max_wait_s=10)
        ticket = await gate.admit(Cost(1, 1000))  # reserved the route's limit
        waiting = asyncio.ensure_future(gate.admit(Cost(1, 500)))
        await asyncio.sleep(0)
        assert not waiting.done()
        ticket.adjust(Cost(1, 200))  # the body turned out small
        other = await asyncio.wait_for(waiting, 1)
        assert gate.held == Cost(2, 700)
        ticket.adjust(Cost(3, 900))  # growing never waits, even past the budget
        assert gate.held == Cost(4, 1400)
        ticket.release()
        other.release()
        assert gate.held == Cost(0, 0)

    asyncio.run(run())


def test_bad_bounds_and_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="max_inputs=0"):
        AdmissionGate(max_inputs=0, max_bytes=1)
    with pytest.raises(ValueError, match="cannot be negative"):
        asyncio.run(AdmissionGate(1, 1).admit(Cost(-1, 0)))


def test_the_snapshot_shows_what_is_held_the_peaks_and_the_limits() -> None:
    async def run() -> dict[str, int]:
        gate = AdmissionGate(max_inputs=10, max_bytes=1000, max_wait_s=0)
        a = await gate.admit(Cost(4, 100))
        b = await gate.admit(Cost(5, 700))
        a.release()
        b.adjust(Cost(5, 300))
        return gate.snapshot()

    assert asyncio.run(run()) == {
        "inputs": 5, "bytes": 300, "peak_inputs": 9, "peak_bytes": 800,
        "max_inputs": 10, "max_bytes": 1000, "waiting": 0,
        "classes": {
            "live": {"inputs": 5, "bytes": 300, "waiting": 0, "admitted_inputs": 9, "shed_inputs": 0},
            "bulk": {"inputs": 0, "bytes": 0, "waiting": 0, "admitted_inputs": 0, "shed_inputs": 0},
        },
    }  # fmt: skip
