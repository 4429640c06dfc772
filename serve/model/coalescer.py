"""Merging concurrent calls to one model deployment into fewer, larger calls.

Each call across a deployment boundary costs serialization and actor-call work in
both processes, whatever it carries. When events carry one image each (a bucket
upload, a one-URI message), an ingress replica handles many small requests at
once; :class:`CallCoalescer` keeps at most ``max_in_flight`` calls per model
going and sends whatever arrived meanwhile as the next call. A lone request is
sent at once (no timer), so coalescing adds no latency on a quiet replica.

A merged call is capped by items and by bytes: a caller's items may be split over
several calls (parts), so that one call never exceeds the transport's message limit
(960x960x3 detector inputs are 2.76 MB each; gRPC between deployments takes 256 MiB).
Items are answered one by one: a part that fails answers only its own items (with
``on_error``), never every caller merged with it.

Waiting callers' items go into parts in turn (:class:`~serve.turns.Turns`): a caller
that had nothing waiting first, then one item per caller at a time, so a caller of one
item is at the head of the next part even behind callers of hundreds (``in_turn``;
without it, a caller's items go together, callers in arrival order, so each finishes
sooner).

With ``express``, while other callers' items in flight or waiting to be sent make at least
``max_items``, the items of one-item callers that had nothing waiting (sparse callers: the
item is their whole call) go in calls of their own (at most ``max_express`` in flight; while
those are taken, they lead the next merged part as before), which the model runs in a batch
of their own ahead of its queue (:class:`~serve.model.batcher.BatchQueue`). A one-image
caller behind a burst then waits for the batch the model is running, not for two merged
calls of other callers' items and then a full batch of them, nor, when a call slot is free,
in a full part of them. A caller of several items gets none of its items express: it waits
for its last item anyway, and its first items would only crowd the express calls. Below that
(a few one-item callers) parts stay merged: express calls would only mean more, smaller
batches.

Deadlines stay per caller. A caller stops waiting at its own deadline, and its items
that were not sent yet are dropped; a part carries the latest deadline of the callers
still in it, so one caller's short deadline never cuts the others' work short. With
``stamp``, each item also carries its own caller's deadline, so the model drops each
caller's expired items individually instead of at the part's latest deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from serve.turns import Turns
from shared.errors import TransientError

T = TypeVar("T")
R = TypeVar("R")

Send = Callable[[list[T], float | None], Awaitable[Sequence[R]]]


class CallerDeadlinePassed(TransientError):
    """A caller's deadline passed before its answers came back; its unsent items were dropped."""


@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    items: list[T]
    deadline: float | None
    answers: list[R | None] = field(init=False)
    left: int = field(init=False)
    future: asyncio.Future[list[R]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.items)
        self.left = len(self.items)

    def answer(self, index: int, value: R) -> None:
        self.answers[index] = value
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(list(self.answers))  # type: ignore[arg-type]

    def fail(self, err: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class CallCoalescer(Generic[T, R]):
    """Sends the items of concurrent :meth:`call` s through ``send`` in merged calls.

    Args:
        send: One call with many items and the latest deadline among their callers;
            returns one answer per item, in order.
        max_in_flight: Calls allowed at once; more callers wait and are merged.
        max_items: Most items in one call (``max_items`` may be changed later: the next part uses it).
        max_bytes: Most bytes (``size_of`` summed) in one call; one item alone may exceed it.
        size_of: An item's size in bytes (default: every item counts 1).
        on_error: The answer that stands for an item of a failed call; without it,
            the failure is raised to the item's caller.
        clock: Wall-clock seconds, the deadlines' clock.
        stamp: ``stamp(item, deadline)``: the item carrying its caller's deadline (for a
            caller that has one), applied as the call joins the queue.
        in_turn: Whether waiting callers' items go into parts in turn (else each caller's
            items in arrival order, one caller after another).
        express: Sends parts of one-item callers' items while a part's worth of other
            items is in flight or waiting, beside the ``max_in_flight`` calls (needs
            ``in_turn``: only then is a caller that had nothing waiting told apart).
        max_express: ``express`` calls allowed at once.
    """

    def __init__(
        self,
        send: Send[T, R],
        max_in_flight: int = 2,
        max_items: int = 256,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] | None = None,
        on_error: Callable[[Exception], R] | None = None,
        clock: Callable[[], float] = time.time,
        stamp: Callable[[T, float], T] | None = None,
        in_turn: bool = True,
        express: Send[T, R] | None = None,
        max_express: int = 1,
    ) -> None:
        if max_in_flight < 1 or max_items < 1 or (max_bytes is not None and max_bytes < 1) or max_express < 1:
            raise ValueError(
                "max_in_flight, max_items, max_bytes and max_express must be >= 1, "
                f"got {max_in_flight}, {max_items}, {max_bytes}, {max_express}"
            )
        if express is not None and not in_turn:
            raise ValueError("express needs in_turn: only callers served in turn have a first item told apart")
        self._send = send
        self._express = express
        self._max_express = max_express
        self._express_in_flight = 0
        self._in_flight_items = 0  # items in the merged calls in flight (express calls aside)
        self._max_in_flight = max_in_flight
        self.max_items = max_items
        self._max_bytes = max_bytes
        self._size_of = size_of or (lambda _item: 1)
        self._on_error = on_error
        self._clock = clock
        self._stamp = stamp
        # The indices of waiting callers' items not sent yet, per caller (by id).
        self._queue: Turns[int, int] = Turns(in_turn=in_turn)
        self._callers: dict[int, _Waiting[T, R]] = {}
        self._in_flight = 0

    async def call(self, items: list[T], deadline: float | None) -> list[R]:
        """The answers for ``items``, sent alone or merged with other callers' items.

        Raises:
            CallerDeadlinePassed: ``deadline`` passed first (items not yet sent are dropped).
        """
        if not items:
            return []
        if deadline is not None and deadline <= self._clock():
            raise CallerDeadlinePassed(f"deadline passed before {len(items)} item(s) were sent")
        if deadline is not None and self._stamp is not None:
            items = [self._stamp(item, deadline) for item in items]
        waiting: _Waiting[T, R] = _Waiting(list(items), deadline)
        self._callers[id(waiting)] = waiting
        for index in range(len(items)):
            self._queue.push(id(waiting), index)
        self._pump()
        if deadline is None:
            return await waiting.future
        try:
            # On timeout the future is cancelled, so its unsent items are skipped.
            return await asyncio.wait_for(waiting.future, max(0.0, deadline - self._clock()))
        except TimeoutError as err:
            raise CallerDeadlinePassed(f"deadline passed with {waiting.left} of {len(items)} item(s) unanswered") from err

    def _sparse_part(self) -> list[tuple[_Waiting[T, R], int]]:
        """The items of sparse callers (:meth:`serve.turns.Turns.first_sparse`), up to a part."""
        part: list[tuple[_Waiting[T, R], int]] = []
        size, now = 0, self._clock()
        while len(part) < self.max_items and (sparse := self._queue.first_sparse()) is not None:
            key, index = sparse
            waiting = self._callers[key]
            item_size = self._size_of(waiting.items[index])
            if part and self._max_bytes is not None and size + item_size > self._max_bytes:
                break
            self._queue.remove(key, index)
            del self._callers[key]  # its only waiting item
            if waiting.future.done() or (waiting.deadline is not None and waiting.deadline <= now):
                waiting.fail(CallerDeadlinePassed("deadline passed before the items were sent"))
                continue
            part.append((waiting, index))
            size += item_size
        return part

    def _next_part(self) -> list[tuple[_Waiting[T, R], int]]:
        part: list[tuple[_Waiting[T, R], int]] = []
        size, now = 0, self._clock()
        while self._queue:
            key, index = self._queue.peek()
            waiting = self._callers[key]
            if waiting.future.done() or (waiting.deadline is not None and waiting.deadline <= now):
                self._queue.drop(key)  # its caller has stopped waiting: drop the work
                del self._callers[key]
                waiting.fail(CallerDeadlinePassed("deadline passed before the items were sent"))
                continue
            item_size = self._size_of(waiting.items[index])
            if part and (
                len(part) >= self.max_items
                or (self._max_bytes is not None and size + item_size > self._max_bytes)
            ):
                break
            self._queue.pop()
            if index == len(waiting.items) - 1:
                del self._callers[key]  # its last item: nothing of it is waiting any more
            part.append((waiting, index))
            size += item_size
        return part

    def _pump(self) -> None:
        # While a batch's worth of others' items is in flight or waiting, one-item callers go
        # express: in a merged part they would wait for those and then run in a batch of
        # them. Below that (an idle coalescer, a few one-item callers), parts stay merged:
        # fewer calls and batches.
        while (
            self._express is not None and self._express_in_flight < self._max_express
            and self._in_flight_items + len(self._queue) - 1 >= self.max_items
        ):  # fmt: skip
            part = self._sparse_part()
            if not part:
                break
            self._express_in_flight += 1
            asyncio.get_running_loop().create_task(self._flush(part, express=True))
        while self._queue and self._in_flight < self._max_in_flight:
            part = self._next_part()
            if not part:
                return
            self._in_flight += 1
            self._in_flight_items += len(part)
            asyncio.get_running_loop().create_task(self._flush(part))

    async def _flush(self, part: list[tuple[_Waiting[T, R], int]], express: bool = False) -> None:
        items = [waiting.items[index] for waiting, index in part]
        deadlines = {waiting.deadline for waiting, _ in part}
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        send = self._express if express and self._express is not None else self._send
        try:
            answers = list(await send(items, deadline))
            if len(answers) != len(items):
                raise RuntimeError(f"merged call returned {len(answers)} answers for {len(items)} items")
        except Exception as err:  # noqa: BLE001 - only this part's items get the failure
            for waiting, index in part:
                if self._on_error is None:
                    waiting.fail(err)
                else:
                    waiting.answer(index, self._on_error(err))
        except BaseException as err:  # cancelled: nobody will answer these callers
            for waiting, _ in part:
                waiting.fail(RuntimeError(f"merged call stopped: {err!r}"))
            raise
        else:
            for (waiting, index), answer in zip(part, answers, strict=True):
                if not waiting.future.done():
                    waiting.answer(index, answer)
        finally:
            if express:
                self._express_in_flight -= 1
            else:
                self._in_flight -= 1
                self._in_flight_items -= len(part)
            self._pump()


__all__ = ["CallCoalescer", "CallerDeadlinePassed"]
