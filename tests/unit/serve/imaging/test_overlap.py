"""The two-stage pipeline: preparing the next batch while the current one is consumed."""

from __future__ import annotations

import threading

import pytest

from serve.imaging.overlap import overlapped


def test_results_come_in_order_and_every_batch_is_prepared_once() -> None:
    prepared: list[int] = []

    def prepare(batch: int) -> int:
        prepared.append(batch)
        return batch * 10

    assert list(overlapped(range(5), prepare, lambda p: p + 1)) == [1, 11, 21, 31, 41]
    assert prepared == [0, 1, 2, 3, 4]
    assert list(overlapped([], prepare, lambda p: p)) == []


def test_the_next_batch_is_prepared_while_the_current_one_is_consumed() -> None:
    # consume(k) waits until prepare(k+1) has started: without overlap this would hang
    # until the timeout and the assertion would fail.
    started = [threading.Event() for _ in range(4)]

    def prepare(batch: int) -> int:
        started[batch].set()
        return batch

    def consume(batch: int) -> bool:
        return batch + 1 >= len(started) or started[batch + 1].wait(timeout=10)

    assert all(overlapped(range(4), prepare, consume))


def test_a_failing_stage_raises_at_its_batch() -> None:
    def prepare(batch: int) -> int:
        if batch == 2:
            raise ValueError("bad batch 2")
        return batch

    seen: list[int] = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for out in overlapped(range(4), prepare, lambda b: b):
            seen.append(out)
    assert seen == [0, 1]


def test_a_batch_prepared_ahead_of_a_failing_one_is_discarded() -> None:
    discarded: list[int] = []

    def consume(prepared: int) -> int:
        if prepared == 10:
            raise RuntimeError("engine failed on batch 1")
        return prepared

    with pytest.raises(RuntimeError, match="batch 1"):
        list(overlapped(range(4), lambda b: b * 10, consume, discarded.append))
    # Batch 2 was prepared while batch 1 ran: its buffer slot must be given back.
    assert discarded == [20]
    assert list(overlapped(range(2), lambda b: b, lambda p: p, discarded.append)) == [0, 1]
    assert discarded == [20]
