"""Merging concurrent model calls: answers go back to their callers, in order; parts are
capped by items and bytes; deadlines stay per caller; a failed part answers only its items."""

from __future__ import annotations

import asyncio

import pytest

from serve.model.coalescer import CallCoalescer, CallerDeadlinePassed


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


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_lone_call_is_sent_at_once() -> None:
    async def run() -> None:
        rec = Recorder()
        rec.release.set()
        coalescer = CallCoalescer(rec.send, max_in_flight=2, clock=Clock())
        assert await coalescer.call([1, 2], 5.0) == [10, 20]
        assert rec.calls == [([1, 2], 5.0)]

    asyncio.run(run())


def test_callers_beyond_the_in_flight_limit_are_merged_and_answered_in_order() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, clock=Clock())
        first = asyncio.ensure_future(coalescer.call([1], 1.0))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(coalescer.call([n, n + 1], float(n))) for n in (2, 4, 6)]
        await asyncio.sleep(0)
        rec.release.set()
        assert await first == [10]
        assert [await r for r in rest] == [[20, 30], [40, 50], [60, 70]]
        # One call for the first caller, one merged call for the three that waited (their
        # items in turn), carrying the latest of their deadlines: no caller's deadline cuts
        # the others short.
        assert rec.calls == [([1], 1.0), ([2, 4, 6, 3, 5, 7], 6.0)]

    asyncio.run(run())


def test_a_merged_call_respects_max_items_splitting_a_caller_if_needed() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=3, clock=Clock())
        calls = [asyncio.ensure_future(coalescer.call([n, n], None)) for n in range(4)]
        await asyncio.sleep(0)
        rec.release.set()
        assert [await c for c in calls] == [[n * 10, n * 10] for n in range(4)]
        # The first caller goes out alone at once; the others follow in parts of at most
        # three, one item of each caller in turn.
        assert [items for items, _ in rec.calls] == [[0, 0], [1, 2, 3], [1, 2, 3]]

    asyncio.run(run())


def test_a_caller_of_one_item_is_in_the_next_part_behind_a_caller_of_many() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=4, clock=Clock())
        blocker = asyncio.ensure_future(coalescer.call([0], None))
        await asyncio.sleep(0)
        many = asyncio.ensure_future(coalescer.call(list(range(100, 120)), None))
        one = asyncio.ensure_future(coalescer.call([7], None))
        await asyncio.sleep(0)
        rec.release.set()
        assert await one == [70]
        assert len(await many) == 20
        await blocker
        assert rec.calls[1][0] == [100, 7, 101, 102]

    asyncio.run(run())


def test_without_turns_a_callers_items_go_together_in_arrival_order() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=4, clock=Clock(), in_turn=False)
        blocker = asyncio.ensure_future(coalescer.call([0], None))
        await asyncio.sleep(0)
        many = asyncio.ensure_future(coalescer.call(list(range(100, 106)), None))
        one = asyncio.ensure_future(coalescer.call([7], None))
        await asyncio.sleep(0)
        rec.release.set()
        await asyncio.gather(blocker, many, one)
        assert [items for items, _ in rec.calls[1:]] == [[100, 101, 102, 103], [104, 105, 7]]

    asyncio.run(run())


def test_a_merged_call_is_capped_by_bytes_and_one_large_call_is_split_in_parts() -> None:
    """960x960x3 detector inputs (2.76 MB) in a 100-input call: parts below the byte cap."""

    async def run() -> None:
        rec = Recorder()
        rec.release.set()
        item_bytes = 960 * 960 * 3
        cap = 64 * 1024 * 1024
        coalescer = CallCoalescer(
            rec.send, max_in_flight=2, max_bytes=cap, size_of=lambda _i: item_bytes, clock=Clock()
        )
        answers = await coalescer.call(list(range(100)), None)
        assert answers == [i * 10 for i in range(100)]
        sizes = [len(items) for items, _ in rec.calls]
        assert sum(sizes) == 100 and len(sizes) > 1
        assert all(n * item_bytes <= cap for n in sizes), sizes

    asyncio.run(run())


def test_one_item_larger_than_the_byte_cap_is_still_sent_alone() -> None:
    async def run() -> None:
        rec = Recorder()
        rec.release.set()
        coalescer = CallCoalescer(rec.send, max_bytes=10, size_of=lambda i: i, clock=Clock())
        assert await coalescer.call([50, 3], None) == [500, 30]
        assert [items for items, _ in rec.calls] == [[50], [3]]

    asyncio.run(run())


def test_without_on_error_a_failed_call_fails_the_callers_in_it() -> None:
    async def run() -> None:
        rec = Recorder(fail=True)
        coalescer = CallCoalescer(rec.send, max_in_flight=1, clock=Clock())
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


def test_a_failed_part_answers_only_its_own_items() -> None:
    async def run() -> None:
        sent: list[list[int]] = []

        async def send(items: list[int], deadline: float | None) -> list[int]:
            sent.append(list(items))
            await asyncio.sleep(0)
            if 4 in items:
                raise ConnectionError("message too large")
            return [i * 10 for i in items]

        coalescer = CallCoalescer(
            send, max_in_flight=1, max_items=2, on_error=lambda err: -1, clock=Clock()
        )
        first = asyncio.ensure_future(coalescer.call([0], None))
        await asyncio.sleep(0)
        # Merged behind the first call, in parts of two, in turn: [1, 3], [2, 4], [5].
        a = asyncio.ensure_future(coalescer.call([1, 2], None))
        b = asyncio.ensure_future(coalescer.call([3, 4, 5], None))
        assert await first == [0]
        # Only the failed part's items get the error's answer.
        assert await a == [10, -1]
        assert await b == [30, -1, 50]
        assert sent == [[0], [1, 3], [2, 4], [5]]

    asyncio.run(run())


def test_a_caller_whose_deadline_passes_stops_waiting_and_its_unsent_items_are_dropped() -> None:
    async def run() -> None:
        clock = Clock(100.0)
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, clock=clock)
        blocker = asyncio.ensure_future(coalescer.call([1], 1000.0))
        await asyncio.sleep(0)
        short = asyncio.ensure_future(coalescer.call([2], 100.001))  # expires while waiting
        long = asyncio.ensure_future(coalescer.call([3], 1000.0))
        with pytest.raises(CallerDeadlinePassed):
            await short
        clock.now = 200.0
        rec.release.set()
        assert await blocker == [10] and await long == [30]
        # The expired caller's item never went out, and the part carries the live caller's deadline.
        assert rec.calls == [([1], 1000.0), ([3], 1000.0)]

    asyncio.run(run())


def test_a_deadline_already_past_is_refused_without_a_call() -> None:
    async def run() -> None:
        rec = Recorder()
        coalescer = CallCoalescer(rec.send, clock=Clock(50.0))
        with pytest.raises(CallerDeadlinePassed, match="before 2 item"):
            await coalescer.call([1, 2], 49.0)
        assert rec.calls == []

    asyncio.run(run())


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CallCoalescer(Recorder().send, max_in_flight=0)
    with pytest.raises(ValueError, match="max_bytes"):
        CallCoalescer(Recorder().send, max_bytes=0)


def test_stamp_gives_each_item_its_own_callers_deadline_in_a_merged_call() -> None:
    async def run() -> None:
        seen: list[tuple[list[tuple[int, float]], float | None]] = []
        release = asyncio.Event()

        async def send(items: list[tuple[int, float]], deadline: float | None) -> list[int]:
            seen.append((list(items), deadline))
            await release.wait()
            return [n for n, _ in items]

        coalescer: CallCoalescer[tuple[int, float], int] = CallCoalescer(
            send, max_in_flight=1, clock=Clock(), stamp=lambda item, deadline: (item[0], deadline)
        )
        first = asyncio.ensure_future(coalescer.call([(1, 0.0)], 1.0))
        await asyncio.sleep(0)
        short = asyncio.ensure_future(coalescer.call([(2, 0.0)], 2.0))
        long = asyncio.ensure_future(coalescer.call([(3, 0.0), (4, 0.0)], 9.0))
        await asyncio.sleep(0)
        release.set()
        assert (await first, await short, await long) == ([1], [2], [3, 4])
        # The merged call carries the latest deadline; each item carries its caller's own.
        assert seen[1] == ([(2, 2.0), (3, 9.0), (4, 9.0)], 9.0)

    asyncio.run(run())


def test_a_caller_that_arrives_while_others_take_turns_goes_ahead_of_the_round() -> None:
    async def run() -> None:
        calls: list[list[int]] = []
        gates = [asyncio.Event() for _ in range(8)]

        async def send(items: list[int], deadline: float | None) -> list[int]:
            calls.append(list(items))
            await gates[len(calls) - 1].wait()
            return [i * 10 for i in items]

        async def until(count: int) -> None:
            while len(calls) < count:
                await asyncio.sleep(0)

        coalescer = CallCoalescer(send, max_in_flight=1, max_items=2, clock=Clock())
        blocker = asyncio.ensure_future(coalescer.call([0], None))
        await until(1)
        busy = [asyncio.ensure_future(coalescer.call(list(range(n, n + 3)), None)) for n in (100, 200, 300)]
        await asyncio.sleep(0)
        gates[0].set()
        await until(2)  # [100, 200] in flight; 300 has not had its first turn yet
        one = asyncio.ensure_future(coalescer.call([7], None))
        await asyncio.sleep(0)
        for gate in gates:
            gate.set()
        assert await one == [70]
        await asyncio.gather(blocker, *busy)
        # 7 goes right after 300 (new callers in arrival order), ahead of 101 and 201
        # that are taking turns; round robin alone would have sent [300, 101], then [201, 7].
        assert calls[1:4] == [[100, 200], [300, 7], [101, 201]]

    asyncio.run(run())


def test_a_one_item_callers_item_goes_express_while_calls_are_in_flight() -> None:
    async def run() -> None:
        rec, fast = Recorder(), Recorder()
        fast.release.set()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=3, clock=Clock(), express=fast.send)
        busy = asyncio.ensure_future(coalescer.call([1, 2, 3], None))
        await asyncio.sleep(0.01)
        # A full part is in flight: a new one-item caller's item goes at once, on the express
        # sender. A two-item caller waits for the slot: it would wait for its second item anyway.
        assert await asyncio.wait_for(coalescer.call([7], None), 1.0) == [70]
        two = asyncio.ensure_future(coalescer.call([8, 9], None))
        await asyncio.sleep(0.01)
        assert [items for items, _ in fast.calls] == [[7]]
        rec.release.set()
        assert await busy == [10, 20, 30] and await two == [80, 90]
        assert [items for items, _ in rec.calls] == [[1, 2, 3], [8, 9]]

    asyncio.run(run())


def test_express_calls_are_bounded_and_carry_only_one_item_callers() -> None:
    async def run() -> None:
        rec, fast = Recorder(), Recorder()
        coalescer = CallCoalescer(
            rec.send, max_in_flight=1, max_items=2, clock=Clock(), express=fast.send, max_express=1
        )
        calls = [asyncio.ensure_future(coalescer.call([0, 1], None))]
        calls += [asyncio.ensure_future(coalescer.call([n], None)) for n in (10, 20, 30)]
        calls += [asyncio.ensure_future(coalescer.call([40, 41], None))]
        await asyncio.sleep(0.01)
        # Caller 0 takes the slot; caller 10 the express call; callers 20 and 30 wait, and go
        # together in the next express call. Caller 40 (two items) waits for the slot.
        assert [items for items, _ in rec.calls] == [[0, 1]]
        assert [items for items, _ in fast.calls] == [[10]]
        fast.release.set()
        await asyncio.sleep(0.01)
        assert [items for items, _ in fast.calls] == [[10], [20, 30]]
        rec.release.set()
        assert [await c for c in calls] == [[0, 10], [100], [200], [300], [400, 410]]
        assert [items for items, _ in rec.calls] == [[0, 1], [40, 41]]

    asyncio.run(run())


def test_a_one_item_callers_item_goes_express_while_a_parts_worth_of_others_items_waits() -> None:
    """A call slot is free but a part of other callers' items waits for it: an item in that
    part would run in a full batch of them."""

    async def run() -> None:
        rec, fast = Recorder(), Recorder()
        fast.release.set()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=4, clock=Clock(), express=fast.send)
        lone = asyncio.ensure_future(coalescer.call([1], None))  # one item in flight
        await asyncio.sleep(0.01)
        many = asyncio.ensure_future(coalescer.call(list(range(10, 16)), None))
        await asyncio.sleep(0.01)

        assert await asyncio.wait_for(coalescer.call([7], None), 1.0) == [70]
        assert [items for items, _ in fast.calls] == [[7]]
        rec.release.set()
        assert await lone == [10] and await many == [i * 10 for i in range(10, 16)]
        assert [items for items, _ in rec.calls] == [[1], [10, 11, 12, 13], [14, 15]]

    asyncio.run(run())


def test_an_express_callers_passed_deadline_drops_its_item_before_it_is_sent() -> None:
    async def run() -> None:
        rec, fast = Recorder(), Recorder()
        clock = Clock()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=1, clock=clock, express=fast.send)
        busy = asyncio.ensure_future(coalescer.call([1], None))
        await asyncio.sleep(0.01)
        first = asyncio.ensure_future(coalescer.call([5], None))  # takes the express call
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(coalescer.call([6], clock.now + 1))
        await asyncio.sleep(0.01)
        clock.now += 2
        fast.release.set()
        assert await first == [50]
        with pytest.raises(CallerDeadlinePassed):
            await late
        assert [items for items, _ in fast.calls] == [[5]]
        rec.release.set()
        await busy

    asyncio.run(run())


def test_first_items_stay_in_merged_parts_while_less_than_a_part_is_in_flight() -> None:
    """A few one-item callers: express calls would only mean more, smaller batches."""

    async def run() -> None:
        rec, fast = Recorder(), Recorder()
        fast.release.set()
        coalescer = CallCoalescer(rec.send, max_in_flight=1, max_items=4, clock=Clock(), express=fast.send)
        calls = [asyncio.ensure_future(coalescer.call([n], None)) for n in range(4)]
        await asyncio.sleep(0.01)
        rec.release.set()
        assert [await c for c in calls] == [[0], [10], [20], [30]]
        assert fast.calls == [] and [items for items, _ in rec.calls] == [[0], [1, 2, 3]]

    asyncio.run(run())


def test_express_needs_callers_served_in_turn() -> None:
    async def send(items: list[int], deadline: float | None) -> list[int]:
        return items

    with pytest.raises(ValueError, match="express needs in_turn"):
        CallCoalescer(send, in_turn=False, express=send)
