"""Dynamic batching with a bounded queue, deadlines and a wait that adapts to arrivals.

One loop per model replica takes whatever is queued (up to ``max_batch_size``)
as soon as the engine is free, so under load batches fill by themselves while
the previous batch runs. When the engine is idle it waits for more items only
if arrivals are dense enough that more are expected within ``max_wait_s``: a
lone request on a quiet replica is dispatched at once, and a burst still forms
full batches.

The queue is bounded: a full queue refuses new items with :class:`Overloaded`
(the ingress answers 429 with ``Retry-After``), so overload sheds early instead
of growing memory and latency until callers time out. Items whose deadline has
passed are dropped before inference: nobody is waiting for them any more.

Two classes share the queue (:class:`~shared.messages.Priority`). Live items are
batched before bulk items and bulk fills the rest of a batch, except that bulk
keeps a minimum share of the batch slots while it has items waiting
(``bulk_min_share``: a credit of that fraction of every batch, so bulk moves even
under a flood of live work). Bulk may fill the queue only up to ``capacity`` less
the live headroom (``live_headroom``); a live item that finds the queue full
pushes out the newest bulk item (which is shed), so live is refused only when no
bulk is left to shed.

A live item waits for the batch in flight and then runs in its own batch, so both
batch sizes are its latency. While live work arrives (an item in the last
:data:`LIVE_ACTIVE_S`), batches carry at most ``bulk_batch_while_live`` of
``max_batch_size`` bulk items, and a batch that holds live items is not topped up
past that either; an idle engine does not wait to fill a batch a live item is in.
With no live work, bulk batches are full size: a backfill alone runs at full speed.

*Express* live items (a one-image caller's, sent ahead by the ingress's
:class:`~serve.model.coalescer.CallCoalescer`) go ahead of the queued live items
and run in a batch of their own, joined only by the bulk items owed their share:
a one-image call behind a burst waits for the batch in flight, then runs in a
batch of its size, not in the next full batch of other callers' items.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.errors import TransientError
from shared.messages import Priority

T = TypeVar("T")
R = TypeVar("R")

# Weight of the newest inter-arrival gap in the running average.
_EWMA_ALPHA = 0.2
#: Defaults: a tenth of the batch slots for bulk while it waits, a quarter of the queue kept for live.
DEFAULT_BULK_MIN_SHARE = 0.1
DEFAULT_LIVE_HEADROOM = 0.25
DEFAULT_BULK_BATCH_WHILE_LIVE = 0.125
#: Live work counts as arriving for this long after its latest item.
LIVE_ACTIVE_S = 2.0


class Overloaded(TransientError):
    """The batch queue is full; ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TransientError):
    """The caller's deadline passed before the item reached the engine."""


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    deadline: float | None  # wall-clock seconds (time.time()): deadlines cross processes
    priority: Priority = Priority.LIVE
    future: asyncio.Future[R] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BatchQueue(Generic[T, R]):
    """Collects items into batches for ``run``, which returns one result per item, in order.

    Args:
        run: Runs one batch; must return exactly ``len(batch)`` results.
        max_batch_size: Largest batch handed to ``run``.
        max_wait_s: Longest an idle engine waits for a batch to fill.
        capacity: Items that may wait at once; more are refused with :class:`Overloaded`.
        bulk_min_share: Fraction of the batch slots bulk items get while any wait (0..1).
        live_headroom: Fraction of ``capacity`` that bulk items may not fill (0..1).
        bulk_batch_while_live: Fraction of ``max_batch_size`` a batch fills with bulk
            items while live work arrives (0..1; at least one item).
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_s: float,
        capacity: int,
        bulk_min_share: float = DEFAULT_BULK_MIN_SHARE,
        live_headroom: float = DEFAULT_LIVE_HEADROOM,
        bulk_batch_while_live: float = DEFAULT_BULK_BATCH_WHILE_LIVE,
    ) -> None:
        self._run = run
        for name, value in (
            ("bulk_min_share", bulk_min_share), ("live_headroom", live_headroom),
            ("bulk_batch_while_live", bulk_batch_while_live),
        ):  # fmt: skip
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        self.bulk_min_share = bulk_min_share
        self.live_headroom = live_headroom
        self.bulk_batch_while_live = bulk_batch_while_live
        self._last_live = float("-inf")  # monotonic time of the latest live arrival
        self.configure(max_batch_size, max_wait_s, capacity)
        self._queues: dict[Priority, deque[_Pending[T, R]]] = {p: deque() for p in Priority}
        self._express: deque[_Pending[T, R]] = deque()  # live items that run in a batch of their own
        self._bulk_credit = 0.0  # bulk slots owed by the minimum share
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._gap_s = float("inf")  # running average of the time between arrivals
        self._last_arrival = 0.0
        self._batch_s = 0.0  # running average of one batch's duration

    def configure(self, max_batch_size: int, max_wait_s: float, capacity: int) -> None:
        """Change the batching parameters; the next batch uses them."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        if capacity < max_batch_size:
            raise ValueError(f"capacity must be >= max_batch_size ({max_batch_size}), got {capacity!r}")
        self.max_batch_size, self.max_wait_s, self.capacity = max_batch_size, max_wait_s, capacity

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return sum(len(q) for q in self._queues.values()) + len(self._express)

    def depth_of(self, priority: Priority) -> int:
        """Items of one class waiting for a batch."""
        return len(self._queues[priority]) + (len(self._express) if priority is Priority.LIVE else 0)

    @property
    def bulk_capacity(self) -> int:
        """Items of the bulk class that may wait at once: the capacity less the live headroom."""
        return max(1, self.capacity - math.ceil(self.capacity * self.live_headroom))

    async def submit(
        self, item: T, deadline: float | None = None, priority: Priority = Priority.LIVE, express: bool = False
    ) -> R:
        """Queue ``item`` in its class and wait for its result.

        An ``express`` live item goes ahead of the other live items, in a batch of the
        express items alone (and the bulk items owed their share); ``express`` bulk
        items are queued as any bulk item.

        Raises:
            Overloaded: the queue holds ``capacity`` items already (for bulk: its
                share of it), or a live item pushed this bulk item out.
            DeadlineExceeded: ``deadline`` passed before the item's batch started.
        """
        self._make_room(priority)
        self._start()
        now = time.monotonic()
        if priority is Priority.LIVE:
            self._last_live = now
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s == float("inf") else (1 - _EWMA_ALPHA) * self._gap_s + _EWMA_ALPHA * gap
        self._last_arrival = now
        pending: _Pending[T, R] = _Pending(item, deadline, priority)
        express = express and priority is Priority.LIVE
        (self._express if express else self._queues[priority]).append(pending)
        assert self._arrived is not None
        self._arrived.set()
        return await pending.future

    def _make_room(self, priority: Priority) -> None:
        """Refuse the item, or for a live item on a full queue shed the newest bulk item instead."""
        bulk = self._queues[Priority.BULK]
        if priority is Priority.BULK and len(bulk) >= self.bulk_capacity:
            raise Overloaded(
                f"batch queue full for bulk work ({len(bulk)} bulk waiting, bulk capacity {self.bulk_capacity} "
                f"of {self.capacity})",
                retry_after_s=self.retry_after_s(),
            )
        if self.depth < self.capacity:
            return
        if priority is Priority.LIVE and bulk:
            shed = bulk.pop()
            if not shed.future.done():
                shed.future.set_exception(
                    Overloaded(
                        "shed for live work: the batch queue is full",
                        retry_after_s=self.retry_after_s(),
                    )
                )
            return
        raise Overloaded(
            f"batch queue full ({self.depth} waiting, capacity {self.capacity})",
            retry_after_s=self.retry_after_s(),
        )

    def retry_after_s(self) -> float:
        """How long the queue needs to drain at the recent batch rate (at least 1 s)."""
        batches = self.depth / self.max_batch_size + 1
        return max(1.0, batches * self._batch_s)

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        """Stop the loop; items still queued fail with :class:`DeadlineExceeded`."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(
                        DeadlineExceeded("the model replica is shutting down")
                    )
            queue.clear()
        for pending in self._express:
            if not pending.future.done():
                pending.future.set_exception(DeadlineExceeded("the model replica is shutting down"))
        self._express.clear()

    async def _serve(self) -> None:
        assert self._arrived is not None
        while True:
            while not self.depth:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill()
            batch = self._take()
            if batch:
                await self._dispatch(batch)

    async def _fill(self) -> None:
        """Wait for a fuller batch only when arrivals are dense enough to deliver one soon."""
        assert self._arrived is not None
        missing = self.max_batch_size - self.depth
        if missing <= 0 or self._gap_s >= self.max_wait_s or self._queues[Priority.LIVE] or self._express:
            return
        wait_until = time.monotonic() + min(self.max_wait_s, self._gap_s * missing)
        while self.depth < self.max_batch_size:
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[T, R]]:
        """Up to ``max_batch_size`` items, live first, bulk its owed share and then the rest.

        Express items, when any wait, make the batch alone with the bulk items owed.
        Expired or abandoned items are dropped.
        """
        now = time.time()
        live, bulk = self._queues[Priority.LIVE], self._queues[Priority.BULK]
        bulk_waiting = bool(bulk)
        owed = min(int(self._bulk_credit), self.max_batch_size) if bulk_waiting else 0
        batch = self._pop(self._express, self.max_batch_size - owed, now)
        express = bool(batch)
        if not express:
            batch = self._pop(live, self.max_batch_size - owed, now)
        taken_live = len(batch)
        room = self.max_batch_size - len(batch)
        if express:  # not topped up: its size is its callers' latency
            room = min(room, owed)
        elif time.monotonic() - self._last_live < LIVE_ACTIVE_S:  # keep batches short while live work arrives
            bulk_cap = max(1, math.floor(self.max_batch_size * self.bulk_batch_while_live))
            room = min(room, max(owed, bulk_cap - taken_live))
        batch += self._pop(bulk, room, now)
        if bulk_waiting:  # bulk is owed its share of every batch formed while it waits
            earned = (
                self._bulk_credit + self.bulk_min_share * len(batch) - (len(batch) - taken_live)
            )
            self._bulk_credit = min(max(0.0, earned), float(self.max_batch_size))
        return batch

    @staticmethod
    def _pop(queue: deque[_Pending[T, R]], count: int, now: float) -> list[_Pending[T, R]]:
        taken: list[_Pending[T, R]] = []
        while queue and len(taken) < count:
            pending = queue.popleft()
            if pending.future.done():  # the caller went away (or a live item pushed it out)
                continue
            if pending.deadline is not None and now > pending.deadline:
                pending.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            taken.append(pending)
        return taken

    async def _dispatch(self, batch: list[_Pending[T, R]]) -> None:
        started = time.monotonic()
        try:
            results = await self._run([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as err:  # every waiter gets the failure, cancellation included
            failure = err if isinstance(err, Exception) else DeadlineExceeded("the batch was cancelled")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            if not isinstance(err, Exception):
                raise
        else:
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        elapsed = time.monotonic() - started
        self._batch_s = elapsed if not self._batch_s else 0.8 * self._batch_s + 0.2 * elapsed
