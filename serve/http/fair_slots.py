"""A bound on concurrent work whose free slots go to waiting calls in turn.

The ingress reads every admitted input from Cloud Storage and writes every result
back: hundreds of requests at once in a burst. Sent all at once they queue at the
storage service (or its emulator) in arrival order, and the one read of a one-image
call waits behind every read of the calls admitted before it. :class:`FairSlots`
keeps at most ``limit`` of them in flight and hands each slot that frees up to the
next call in turn (:class:`~serve.turns.Turns`: a call with nothing waiting first,
then one request per busy call at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable

from serve.turns import Turns


class FairSlots:
    """At most ``limit`` holders at once; slots that free up go to the waiting calls in turn."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self.limit = limit
        self.held = 0
        self._waiting: Turns[Hashable, asyncio.Future[None]] = Turns()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def turn(self, call: Hashable) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block, taken in ``call``'s turn."""
        await self._acquire(call)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, call: Hashable) -> None:
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.push(call, granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as the caller went away: pass the slot on
            else:
                self._waiting.remove(call, granted)
            raise

    def _release(self) -> None:
        self.held -= 1
        while self.held < self.limit and self._waiting:
            _, granted = self._waiting.pop()
            if granted.done():  # its caller was cancelled and has not yet taken it out of the line
                continue
            granted.set_result(None)
            self.held += 1


__all__ = ["FairSlots"]
