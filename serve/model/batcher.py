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
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.errors import TransientError

T = TypeVar("T")
R = TypeVar("R")

# Weight of the newest inter-arrival gap in the running average.
_EWMA_ALPHA = 0.2


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
    future: asyncio.Future[R] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchQueue(Generic[T, R]):
    """Collects items into batches for ``run``, which returns one result per item, in order.

    Args:
        run: Runs one batch; must return exactly ``len(batch)`` results.
        max_batch_size: Largest batch handed to ``run``.
        max_wait_s: Longest an idle engine waits for a batch to fill.
        capacity: Items that may wait at once; more are refused with :class:`Overloaded`.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_batch_size: int,
        max_wait_s: float,
        capacity: int,
    ) -> None:
        self._run = run
        self.configure(max_batch_size, max_wait_s, capacity)
        self._queue: deque[_Pending[T, R]] = deque()
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
        return len(self._queue)

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            Overloaded: the queue holds ``capacity`` items already.
            DeadlineExceeded: ``deadline`` passed before the item's batch started.
        """
        if len(self._queue) >= self.capacity:
            raise Overloaded(
                f"batch queue full ({len(self._queue)} waiting, capacity {self.capacity})",
                retry_after_s=self.retry_after_s(),
            )
        self._start()
        now = time.monotonic()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s == float("inf") else (1 - _EWMA_ALPHA) * self._gap_s + _EWMA_ALPHA * gap
        self._last_arrival = now
        pending: _Pending[T, R] = _Pending(item, deadline)
        self._queue.append(pending)
        assert self._arrived is not None
        self._arrived.set()
        return await pending.future

    def retry_after_s(self) -> float:
        """How long the queue needs to drain at the recent batch rate (at least 1 s)."""
        batches = len(self._queue) / self.max_batch_size + 1
        return max(1.0, batches * self._batch_s)

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        """Stop the loop; items still queued fail with :class:`DeadlineExceeded`."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(DeadlineExceeded("the model replica is shutting down"))
        self._queue.clear()

    async def _serve(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill()
            batch = self._take()
            if batch:
                await self._dispatch(batch)

    async def _fill(self) -> None:
        """Wait for a fuller batch only when arrivals are dense enough to deliver one soon."""
        assert self._arrived is not None
        missing = self.max_batch_size - len(self._queue)
        if missing <= 0 or self._gap_s >= self.max_wait_s:
            return
        wait_until = time.monotonic() + min(self.max_wait_s, self._gap_s * missing)
        while len(self._queue) < self.max_batch_size:
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[T, R]]:
        """Up to ``max_batch_size`` live items; expired or abandoned ones are dropped."""
        now = time.time()
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # the caller went away
                continue
            if pending.deadline is not None and now > pending.deadline:
                pending.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            batch.append(pending)
        return batch

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
