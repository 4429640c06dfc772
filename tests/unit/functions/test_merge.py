"""Concurrent invocations share Serve calls; each gets exactly its own answers."""

from __future__ import annotations

import threading
import time

import pytest

from functions._merge import CallMerger, SlotTimeout

# Deadlines far enough ahead that no test waits for them.
FAR = time.time() + 3600


class SlowServe:
    def __init__(self, delay_s: float = 0.05, fail_on: int | None = None) -> None:
        self.calls: list[tuple[list[int], float]] = []
        self.delay_s, self.fail_on = delay_s, fail_on
        self.in_flight = self.peak = 0
        self._lock = threading.Lock()

    def send(self, items: list[int], deadline: float) -> list[object]:
        with self._lock:
            self.calls.append((list(items), deadline))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(self.delay_s)
        with self._lock:
            self.in_flight -= 1
        if self.fail_on is not None and self.fail_on in items:
            raise ConnectionError("Serve unreachable")
        return [ValueError(f"item {i} refused") if i < 0 else i * 10 for i in items]


def _concurrently(merger: CallMerger, batches: list[list[int]]) -> list[list[object]]:
    out: list[list[object]] = [[] for _ in batches]
    start = threading.Barrier(len(batches))

    def run(k: int) -> None:
        start.wait()
        out[k] = merger.submit(batches[k], deadline=FAR + k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_a_lone_invocation_is_sent_at_once() -> None:
    serve = SlowServe(delay_s=0)
    assert CallMerger(serve.send).submit([1, 2], deadline=FAR) == [10, 20]
    assert serve.calls == [([1, 2], FAR)]


def test_concurrent_invocations_are_merged_and_each_gets_its_own_answers() -> None:
    serve = SlowServe()
    batches = [[k] for k in range(16)]

    answers = _concurrently(CallMerger(serve.send, max_in_flight=2), batches)

    assert answers == [[k * 10] for k in range(16)]
    assert serve.peak <= 2 and len(serve.calls) < 16  # merged, never more than two at once
    assert sorted(i for items, _ in serve.calls for i in items) == list(range(16))
    # The earliest deadline: Serve stops when the first caller of the call gives up.
    assert all(d == min(FAR + i for i in items) for items, d in serve.calls)


def test_a_failure_for_one_item_stays_with_that_item() -> None:
    answers = _concurrently(CallMerger(SlowServe().send, max_in_flight=1), [[1], [-2], [3]])
    assert answers[0] == [10] and answers[2] == [30]
    assert isinstance(answers[1][0], ValueError)


def test_a_failed_call_fails_only_the_invocations_merged_into_it() -> None:
    serve = SlowServe(fail_on=7)
    merger = CallMerger(serve.send, max_in_flight=1)
    answers = _concurrently(merger, [[k] for k in range(8)])
    failed_call = next(items for items, _ in serve.calls if 7 in items)
    for k, answer in enumerate(answers):
        if k in failed_call:
            assert isinstance(answer[0], ConnectionError)
        else:
            assert answer == [k * 10]
    assert merger.submit([5], deadline=FAR) == [50]  # still usable


def test_merged_calls_respect_max_items() -> None:
    serve = SlowServe()
    _concurrently(CallMerger(serve.send, max_in_flight=1, max_items=3), [[k, k] for k in range(6)])
    assert all(len(items) <= 3 for items, _ in serve.calls)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CallMerger(SlowServe().send, max_in_flight=0)


def test_a_thread_only_ever_leads_the_call_that_carries_its_own_items() -> None:
    serve = SlowServe(delay_s=0.01)
    owner: dict[int, int] = {}
    led: list[tuple[int, list[int]]] = []

    def send(items: list[int], deadline: float) -> list[object]:
        led.append((threading.get_ident(), list(items)))
        return serve.send(items, deadline)

    merger = CallMerger(send, max_in_flight=1, max_items=3)

    def run(k: int, start: threading.Barrier) -> None:
        owner[k] = threading.get_ident()
        start.wait()
        assert merger.submit([k], deadline=FAR) == [k * 10]

    start = threading.Barrier(24)
    threads = [threading.Thread(target=run, args=(k, start)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert sorted(i for _, items in led for i in items) == list(range(24))
    for leader, items in led:
        assert leader in {owner[i] for i in items}, (leader, items)
    # One call per leader at most: a thread whose answers are there leads nothing more.
    assert len({leader for leader, _ in led}) == len(led)


def test_a_caller_still_waiting_for_a_slot_at_its_deadline_is_answered_and_never_sent() -> None:
    release = threading.Event()
    calls: list[list[int]] = []

    def send(items: list[int], deadline: float) -> list[object]:
        calls.append(list(items))
        release.wait(10)
        return [i * 10 for i in items]

    merger = CallMerger(send, max_in_flight=1)
    first = threading.Thread(target=merger.submit, args=([1], FAR))
    first.start()
    while not calls:
        time.sleep(0.001)

    answers = merger.submit([2, 3], deadline=time.time() + 0.05)  # the one slot stays busy
    release.set()
    first.join(10)

    assert [type(a) for a in answers] == [SlotTimeout, SlotTimeout]
    assert calls == [[1]]
    assert merger.submit([4], deadline=FAR) == [40]
    assert calls == [[1], [4]]


def test_a_caller_whose_deadline_has_passed_is_not_sent() -> None:
    serve = SlowServe(delay_s=0)
    answers = CallMerger(serve.send).submit([1], deadline=time.time() - 1)
    assert isinstance(answers[0], SlotTimeout) and serve.calls == []
