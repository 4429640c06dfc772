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

Every wait is bounded by the invocation's own deadline, so the function always
answers within its timeout:

- the oldest waiting invocation leads the next call, and a thread only ever
  leads the one call that carries its own items: once its answers are there it
  returns, it never sends a call for others;
- an invocation still waiting for a slot at its deadline is answered with
  :class:`SlotTimeout` (the event fails and is redelivered) and is never sent;
- a merged call carries the *earliest* deadline of its invocations: Serve then
  stops when the first caller gives up, and no caller's work runs on past the
  point where that caller has already failed and been redelivered;
- a follower whose call is late by more than :data:`FOLLOWER_GRACE_S` past its
  deadline stops waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: ``send(items, deadline)`` returns, per item, its answer or the exception for it;
#: it must return by ``deadline`` (an epoch time), give or take a connection's set-up.
Send = Callable[[list[T], float], Sequence["R | BaseException"]]

#: How long past its own deadline a follower waits for the call that carries its items
#: (that call's deadline is never later than the follower's, so this only covers a
#: ``send`` that overruns its deadline).
FOLLOWER_GRACE_S = 5.0


class SlotTimeout(TimeoutError):
    """An invocation's deadline passed before its items could be sent or answered."""


@dataclass(slots=True, eq=False)
class _Waiter(Generic[T, R]):
    items: list[T]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[R | BaseException] | None = None


class CallMerger(Generic[T, R]):
    """Sends the items of concurrent :meth:`submit` calls in merged calls.

    Args:
        send: One call with many items and the earliest deadline among them.
        max_in_flight: Calls allowed at once; later callers are merged.
        max_items: Largest merged call (Serve accepts 100 requests per call).
        clock: Epoch seconds (deadlines are epoch times: Serve is told them).
    """

    def __init__(
        self,
        send: Send[T, R],
        max_in_flight: int = 2,
        max_items: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_in_flight < 1 or max_items < 1:
            raise ValueError(f"max_in_flight and max_items must be >= 1, got {max_in_flight}, {max_items}")
        self._send = send
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._clock = clock
        self._pending: list[_Waiter[T, R]] = []
        self._in_flight = 0
        self._changed = threading.Condition()

    def submit(self, items: Sequence[T], deadline: float) -> list[R | BaseException]:
        """Per item of ``items``: its answer, or the exception that stands for it.

        Returns by ``deadline`` (plus :data:`FOLLOWER_GRACE_S` at most when another
        thread's call carries the items); past it every item is a :class:`SlotTimeout`.
        """
        waiter: _Waiter[T, R] = _Waiter(list(items), deadline)
        with self._changed:
            self._pending.append(waiter)
            group = self._take(waiter)
        if group:
            self._run(group)
        assert waiter.answers is not None
        return waiter.answers

    def _take(self, waiter: _Waiter[T, R]) -> list[_Waiter[T, R]]:
        """``waiter``'s group when it may lead one, or ``[]`` once its answers are there.

        Called with the lock held; waits on it, never past ``waiter``'s deadline (plus
        the grace once another thread's call carries its items).
        """
        while not waiter.done.is_set():
            now = self._clock()
            self._expire(now)
            if waiter.done.is_set():
                break
            if self._pending and self._pending[0] is waiter and self._in_flight < self._max_in_flight:
                group, size = [], 0
                while self._pending and (not group or size + len(self._pending[0].items) <= self._max_items):
                    group.append(self._pending.pop(0))
                    size += len(group[-1].items)
                self._in_flight += 1
                return group
            if waiter in self._pending:
                self._changed.wait(max(0.0, waiter.deadline - now))
                continue
            # Carried by another thread's call, whose deadline is not later than ours.
            late = now - waiter.deadline
            if late >= FOLLOWER_GRACE_S:
                self._answer(waiter, SlotTimeout(f"the call carrying these items ran {late:.1f} s past their deadline"))
                break
            self._changed.wait(FOLLOWER_GRACE_S - late)
        return []

    def _expire(self, now: float) -> None:
        """Answer every waiter whose deadline passed before it got a slot; it is never sent."""
        expired = [w for w in self._pending if w.deadline <= now]
        if not expired:
            return
        self._pending = [w for w in self._pending if w.deadline > now]
        for w in expired:
            self._answer(w, SlotTimeout(f"no free call slot before the deadline ({now - w.deadline:.1f} s ago)"))
        # A new oldest waiter may now lead.
        self._changed.notify_all()

    @staticmethod
    def _answer(waiter: _Waiter[T, R], err: BaseException) -> None:
        waiter.answers = [err] * len(waiter.items)
        waiter.done.set()

    def _run(self, group: list[_Waiter[T, R]]) -> None:
        items = [item for waiter in group for item in waiter.items]
        try:
            answers: list[R | BaseException] = list(self._send(items, min(w.deadline for w in group)))
            if len(answers) != len(items):
                raise RuntimeError(f"merged call returned {len(answers)} answers for {len(items)} items")
        except Exception as err:  # noqa: BLE001 - every caller of the group gets the failure
            answers = [err] * len(items)
        start = 0
        with self._changed:
            for waiter in group:
                if not waiter.done.is_set():  # a follower may have given up on a late call
                    waiter.answers = answers[start : start + len(waiter.items)]
                    waiter.done.set()
                start += len(waiter.items)
            self._in_flight -= 1
            self._changed.notify_all()
