"""Concurrent invocations share Serve calls; each gets exactly its own answers."""

from __future__ import annotations

import threading
import time

import pytest

from functions._merge import CallMerger


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
        out[k] = merger.submit(batches[k], deadline=100.0 + k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_a_lone_invocation_is_sent_at_once() -> None:
    serve = SlowServe(delay_s=0)
    assert CallMerger(serve.send).submit([1, 2], deadline=5.0) == [10, 20]
    assert serve.calls == [([1, 2], 5.0)]


def test_concurrent_invocations_are_merged_and_each_gets_its_own_answers() -> None:
    serve = SlowServe()
    batches = [[k] for k in range(16)]

    answers = _concurrently(CallMerger(serve.send, max_in_flight=2), batches)

    assert answers == [[k * 10] for k in range(16)]
    assert serve.peak <= 2 and len(serve.calls) < 16  # merged, never more than two at once
    assert sorted(i for items, _ in serve.calls for i in items) == list(range(16))
    assert all(d == max(100.0 + i for i in items) for items, d in serve.calls)  # the latest deadline


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
    assert merger.submit([5], deadline=1.0) == [50]  # still usable


def test_merged_calls_respect_max_items() -> None:
    serve = SlowServe()
    _concurrently(CallMerger(serve.send, max_in_flight=1, max_items=3), [[k, k] for k in range(6)])
    assert all(len(items) <= 3 for items, _ in serve.calls)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CallMerger(SlowServe().send, max_in_flight=0)
