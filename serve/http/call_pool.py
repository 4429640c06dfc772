"""A thread pool that runs the tasks of concurrent calls in turn.

A :class:`~concurrent.futures.ThreadPoolExecutor` runs tasks first come first served:
a call of one image submitted behind twelve calls of sixteen waits for all of their
decodes. :class:`CallPool` keeps a queue per call (:class:`~serve.turns.Turns`) and
gives each free thread the next task of the call whose turn it is, so a call with no
task queued has its task started next, and busy calls take turns. Tasks of one call
keep their order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from serve.turns import Turns


@dataclass(slots=True)
class _Task:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class CallPool(Executor):
    """``max_workers`` threads (started by the first tasks) serving calls in turn.

    :meth:`submit` (the :class:`~concurrent.futures.Executor` interface, for
    ``loop.run_in_executor``) files a task under no call; :meth:`submit_for` under ``call``.
    """

    def __init__(
        self,
        max_workers: int,
        thread_name_prefix: str = "call-pool",
        initializer: Callable[[], object] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._initializer = initializer
        self._ready = threading.Condition()
        self._calls: Turns[Hashable, _Task] = Turns()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.submit_for(None, fn, *args, **kwargs)

    def submit_for(self, call: Hashable, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` after the earlier tasks of ``call``, in ``call``'s turn."""
        future: Future[Any] = Future()
        with self._ready:
            if self._shutdown:
                raise RuntimeError("cannot submit to a CallPool that was shut down")
            self._calls.push(call, _Task(future, fn, args, kwargs))
            if len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._ready.notify()
        return future

    def _next(self) -> _Task | None:
        """The next task in turn (``None`` once shut down with nothing left); holds the lock."""
        while not self._calls:
            if self._shutdown:
                return None
            self._ready.wait()
        return self._calls.pop()[1]

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._ready:
                task = self._next()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                result = task.fn(*task.args, **task.kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the task's caller
                task.future.set_exception(err)
            else:
                task.future.set_result(result)
            del task  # drop the arguments (image bytes) before waiting for the next task

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._shutdown = True
            if cancel_futures:
                for task in self._calls.values():
                    task.future.cancel()
                self._calls.clear()
            self._ready.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


async def run_in_turn(executor: Executor, call: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``executor``, in ``call``'s turn when it is a :class:`CallPool`."""
    if isinstance(executor, CallPool):
        return await asyncio.wrap_future(executor.submit_for(call, fn, *args))
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


__all__ = ["CallPool", "run_in_turn"]
