"""Two-stage pipeline: preparing batch k+1 overlaps the inference of batch k.

The preparing stage runs on one worker thread; on a GPU its kernels and the
decoder run on the slot's own CUDA stream (see
:class:`serve.imaging.device_batch.DeviceBatchPreparer`), so they overlap the
engine's work on its stream, and the slower stage sets the rate instead of the
sum of both. At most two batches are in flight, which is what the preparer's two
slots allow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["overlapped"]

In = TypeVar("In")
Prepared = TypeVar("Prepared")
Out = TypeVar("Out")


def overlapped(
    batches: Iterable[In],
    prepare: Callable[[In], Prepared],
    consume: Callable[[Prepared], Out],
    discard: Callable[[Prepared], None] | None = None,
) -> Iterator[Out]:
    """``consume(prepare(b))`` for each batch in order, ``prepare`` one batch ahead on a thread.

    An exception from either stage is raised from the iterator, at the batch it belongs to.
    When one is raised (or the iterator is closed early), the batch prepared ahead is
    never consumed: it is given to ``discard`` (e.g. to release its buffer slot).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        items = iter(batches)
        try:
            pending = pool.submit(prepare, next(items))
        except StopIteration:
            return
        try:
            for item in items:
                ready = pending.result()
                pending = pool.submit(prepare, item)
                yield consume(ready)
            ready, pending = pending.result(), None
            yield consume(ready)
        finally:
            if pending is not None and discard is not None:
                _discard(pending, discard)


def _discard(pending: Future[Prepared], discard: Callable[[Prepared], None]) -> None:
    try:
        prepared = pending.result()
    except Exception:  # noqa: BLE001 - its failure is moot: the run already stopped on another
        return
    discard(prepared)
