"""Merging concurrent calls to one model deployment into fewer, larger calls.

Each call across a deployment boundary costs serialization and actor-call work in
both processes, whatever it carries. When events carry one image each (a bucket
upload, a one-URI message), an ingress replica handles many small requests at
once; :class:`CallCoalescer` keeps at most ``max_in_flight`` calls per model
going and sends whatever arrived meanwhile as the next call. A lone request is
sent at once (no timer), so coalescing adds no latency on a quiet replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Send = Callable[[list[T], float | None], Awaitable[Sequence[R]]]


@dataclass(slots=True)
class _Waiting(Generic[T, R]):
    items: list[T]
    deadline: float | None
    future: asyncio.Future[list[R]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class CallCoalescer(Generic[T, R]):
    """Sends the items of concurrent :meth:`call` s through ``send`` in merged calls.

    Args:
        send: One call with many items and the latest deadline among them; returns
            one answer per item, in order.
        max_in_flight: Calls allowed at once; more callers wait and are merged.
        max_items: Largest merged call.
    """

    def __init__(self, send: Send[T, R], max_in_flight: int = 2, max_items: int = 256) -> None:
        if max_in_flight < 1 or max_items < 1:
            raise ValueError(f"max_in_flight and max_items must be >= 1, got {max_in_flight}, {max_items}")
        self._send = send
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._waiting: list[_Waiting[T, R]] = []
        self._in_flight = 0

    async def call(self, items: list[T], deadline: float | None) -> list[R]:
        """The answers for ``items``, sent alone or merged with other callers' items."""
        waiting: _Waiting[T, R] = _Waiting(list(items), deadline)
        self._waiting.append(waiting)
        self._pump()
        return await waiting.future

    def _pump(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            group, size = [], 0
            while self._waiting and (not group or size + len(self._waiting[0].items) <= self._max_items):
                waiting = self._waiting.pop(0)
                group.append(waiting)
                size += len(waiting.items)
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._flush(group))

    async def _flush(self, group: list[_Waiting[T, R]]) -> None:
        items = [item for waiting in group for item in waiting.items]
        deadlines = [w.deadline for w in group]
        deadline = None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None)
        try:
            answers = list(await self._send(items, deadline))
            if len(answers) != len(items):
                raise RuntimeError(f"merged call returned {len(answers)} answers for {len(items)} items")
        except BaseException as err:  # noqa: BLE001 - every caller of the group gets the failure
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(err if isinstance(err, Exception) else RuntimeError(repr(err)))
            if not isinstance(err, Exception):
                raise
        else:
            start = 0
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_result(answers[start : start + len(waiting.items)])
                start += len(waiting.items)
        finally:
            self._in_flight -= 1
            self._pump()
