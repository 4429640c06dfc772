"""Merging the Serve calls of concurrent invocations in one function instance.

A function instance handles several events at once (gunicorn threads locally,
request concurrency on Cloud Functions gen2). Events that carry one image each
would otherwise cost one HTTP call through Serve's proxy, ingress and model
deployment per image. :class:`CallMerger` keeps at most ``max_in_flight`` calls
going and sends the requests of every invocation that arrived meanwhile as the
next call; each invocation still waits for, and answers with, its own results,
so a message is acknowledged only when its own results are stored.

No extra thread: a waiting invocation's thread sends the next merged call
itself (leader/follower), so a lone event goes out at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: ``send(items, deadline)`` returns, per item, its answer or the exception for it.
Send = Callable[[list[T], float], Sequence["R | BaseException"]]


@dataclass(slots=True)
class _Waiter(Generic[T, R]):
    items: list[T]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[R | BaseException] | None = None


class CallMerger(Generic[T, R]):
    """Sends the items of concurrent :meth:`submit` calls in merged calls.

    Args:
        send: One call with many items and the latest deadline among them.
        max_in_flight: Calls allowed at once; later callers are merged.
        max_items: Largest merged call (Serve accepts 100 requests per call).
    """

    def __init__(self, send: Send[T, R], max_in_flight: int = 2, max_items: int = 100) -> None:
        if max_in_flight < 1 or max_items < 1:
            raise ValueError(f"max_in_flight and max_items must be >= 1, got {max_in_flight}, {max_items}")
        self._send = send
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._pending: list[_Waiter[T, R]] = []
        self._in_flight = 0
        self._changed = threading.Condition()

    def submit(self, items: Sequence[T], deadline: float) -> list[R | BaseException]:
        """Per item of ``items``: its answer, or the exception that stands for it."""
        waiter: _Waiter[T, R] = _Waiter(list(items), deadline)
        with self._changed:
            self._pending.append(waiter)
        while not waiter.done.is_set():
            group = self._take(waiter)
            if group:
                self._run(group)
        assert waiter.answers is not None
        return waiter.answers

    def _take(self, waiter: _Waiter[T, R]) -> list[_Waiter[T, R]]:
        """The next group to send, or ``[]`` after waiting for a slot or for ``waiter``'s answers."""
        with self._changed:
            while not waiter.done.is_set():
                if self._pending and self._in_flight < self._max_in_flight:
                    group, size = [], 0
                    while self._pending and (not group or size + len(self._pending[0].items) <= self._max_items):
                        group.append(self._pending.pop(0))
                        size += len(group[-1].items)
                    self._in_flight += 1
                    return group
                self._changed.wait()
            return []

    def _run(self, group: list[_Waiter[T, R]]) -> None:
        items = [item for waiter in group for item in waiter.items]
        try:
            answers: list[R | BaseException] = list(self._send(items, max(w.deadline for w in group)))
            if len(answers) != len(items):
                raise RuntimeError(f"merged call returned {len(answers)} answers for {len(items)} items")
        except Exception as err:  # noqa: BLE001 - every caller of the group gets the failure
            answers = [err] * len(items)
        start = 0
        with self._changed:
            for waiter in group:
                waiter.answers = answers[start : start + len(waiter.items)]
                start += len(waiter.items)
                waiter.done.set()
            self._in_flight -= 1
            self._changed.notify_all()
