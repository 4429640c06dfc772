"""Work queued per caller and handed out one piece per caller at a time.

The ingress's shared stages (decode threads, storage slots, calls to a model) serve
many concurrent callers. First come first served, a one-image call waits behind every
piece of work of the calls that arrived before it. :class:`Turns` keeps a queue per
caller and serves the callers round robin, one piece each, a caller's pieces in order.

One rule comes from FQ-CoDel (RFC 8290, section 4.1, "new flows"): a caller that had
nothing queued goes ahead of the callers already taking turns, for one piece; after
it, it joins the back of the round. A one-image call is then served next at every
stage, not after one piece of each of a hundred busy callers, while the busy callers
still share everything else evenly (a caller that keeps queueing work is new only
while its queue runs dry, so it cannot stay ahead).

``in_turn=False`` serves callers in arrival order instead, each caller's pieces
together: the order for work that should finish call by call (a backfill's).

Not thread-safe: the owner holds its own lock (or runs on one event loop).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Turns(Generic[K, V]):
    """Pieces of work (``V``) queued per caller (``K``), handed out in turn."""

    def __init__(self, *, in_turn: bool = True) -> None:
        self._in_turn = in_turn
        # Callers whose queue was empty when their current piece came: served first.
        self._new: OrderedDict[K, deque[V]] = OrderedDict()
        # Callers taking turns (or, without in_turn, every caller in arrival order).
        self._old: OrderedDict[K, deque[V]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        """Pieces queued, of every caller."""
        return self._count

    def first_sparse(self) -> tuple[K, V] | None:
        """The first caller that had nothing queued and has one piece queued now (its
        whole call, for a one-image call: a sparse flow, in FQ-CoDel's terms), and that
        piece, left queued; None when there is no such caller."""
        for key, queue in self._new.items():
            if len(queue) == 1:
                return key, queue[0]
        return None

    def push(self, key: K, value: V) -> None:
        """Queue ``value`` after ``key``'s earlier pieces."""
        queue = self._queue_of(key)
        if queue is None:
            queue = deque()
            (self._new if self._in_turn else self._old)[key] = queue
        queue.append(value)
        self._count += 1

    def peek(self) -> tuple[K, V]:
        """The caller whose turn it is and its next piece, left queued.

        Raises:
            IndexError: nothing is queued.
        """
        key, queue = self._head()
        return key, queue[0]

    def pop(self) -> tuple[K, V]:
        """The caller whose turn it is and its next piece; the turn passes on.

        Raises:
            IndexError: nothing is queued.
        """
        key, queue = self._head()
        value = queue.popleft()
        self._count -= 1
        line = self._new if key in self._new else self._old
        if not queue:
            del line[key]
        elif self._in_turn:
            del line[key]
            self._old[key] = queue  # to the back of the round
        return key, value

    def remove(self, key: K, value: V) -> bool:
        """Take ``value`` out of ``key``'s queue (a piece whose caller gave up); whether it was there."""
        queue = self._queue_of(key)
        if queue is None:
            return False
        try:
            queue.remove(value)
        except ValueError:
            return False
        self._count -= 1
        if not queue:
            self._forget(key)
        return True

    def drop(self, key: K) -> list[V]:
        """Take every piece of ``key`` out; the pieces, in order."""
        queue = self._queue_of(key)
        if queue is None:
            return []
        self._forget(key)
        self._count -= len(queue)
        return list(queue)

    def values(self) -> Iterator[V]:
        """Every queued piece (of the new callers first)."""
        for line in (self._new, self._old):
            for queue in line.values():
                yield from queue

    def clear(self) -> None:
        self._new.clear()
        self._old.clear()
        self._count = 0

    def _head(self) -> tuple[K, deque[V]]:
        line = self._new or self._old
        if not line:
            raise IndexError("nothing is queued")
        return next(iter(line.items()))

    def _queue_of(self, key: K) -> deque[V] | None:
        queue = self._new.get(key)
        return queue if queue is not None else self._old.get(key)

    def _forget(self, key: K) -> None:
        self._new.pop(key, None)
        self._old.pop(key, None)


__all__ = ["Turns"]
