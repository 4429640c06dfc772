"""The decode pool: concurrent calls' tasks in turn, the Executor interface kept."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.http.call_pool import CallPool


def test_a_call_of_one_task_runs_after_at_most_one_task_of_a_call_that_came_first() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    order: list[str] = []
    blocker = pool.submit_for("blocker", gate.wait)  # the only thread is busy meanwhile
    many = [pool.submit_for("many", order.append, f"many{i}") for i in range(5)]
    one = pool.submit_for("one", order.append, "one")
    gate.set()
    for future in [blocker, *many, one]:
        future.result(timeout=5)
    pool.shutdown()
    assert order == ["many0", "one", "many1", "many2", "many3", "many4"]


def test_a_call_with_nothing_queued_runs_next_ahead_of_busy_calls_taking_turns() -> None:
    pool = CallPool(1)
    first_gate, a_gate, a_started = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def a0() -> None:
        a_started.set()
        a_gate.wait()

    futures = [pool.submit_for("x", first_gate.wait)]  # the only thread waits meanwhile
    futures += [pool.submit_for("a", a0)] + [pool.submit_for("a", order.append, f"a{i}") for i in range(1, 4)]
    first_gate.set()
    a_started.wait(5)  # a0 runs with a1..a3 queued: a is taking turns
    futures += [pool.submit_for("b", order.append, f"b{i}") for i in range(1, 3)]
    futures.append(pool.submit_for("one", order.append, "one"))
    a_gate.set()
    for future in futures:
        future.result(timeout=5)
    pool.shutdown()
    # b and "one" had nothing queued: their first tasks go ahead of a's turn, in arrival
    # order (round robin alone: a1, b1, one, a2, b2, a3); then a and b take turns.
    assert order == ["b1", "one", "a1", "b2", "a2", "a3"]


def test_a_task_that_raises_fails_only_its_own_future() -> None:
    with CallPool(2) as pool:
        bad = pool.submit_for("a", int, "not a number")
        good = pool.submit_for("a", int, "7")
        with pytest.raises(ValueError, match="not a number"):
            bad.result(timeout=5)
        assert good.result(timeout=5) == 7


def test_it_serves_run_in_executor_and_runs_the_initializer_on_each_thread() -> None:
    started: list[str] = []
    pool = CallPool(2, thread_name_prefix="decode", initializer=lambda: started.append(threading.current_thread().name))

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(pool, pow, n, 2) for n in range(6)))

    assert asyncio.run(run()) == [0, 1, 4, 9, 16, 25]
    pool.shutdown()
    assert sorted(started) == ["decode_0", "decode_1"]


def test_shutdown_finishes_queued_work_and_refuses_more_or_cancels_it_when_asked() -> None:
    pool = CallPool(1)
    gate = threading.Event()
    pool.submit(gate.wait)
    queued = pool.submit(lambda: "ran")
    gate.set()
    pool.shutdown(wait=True)
    assert queued.result(timeout=5) == "ran"
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(print)

    pool = CallPool(1)
    gate, started = threading.Event(), threading.Event()
    running = pool.submit(lambda: started.set() or gate.wait())
    dropped = pool.submit(lambda: "never")
    assert started.wait(5)
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert running.result(timeout=5) is True
    assert dropped.cancelled()


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        CallPool(0)
