"""Admission of calls to an ingress replica, by inputs and by bytes, in fair turns.

A call states its cost (inputs, bytes) *before* its body is read, decompressed or
parsed: a raw image or an Open Inference Protocol body by its declared
``Content-Length`` (the route's limit when it declares none), so no large body is
held before it is admitted. A call that fits runs at once. One that does not fit
waits in line, at most ``max_wait_s`` and within its deadline.

The line is served by fair share, not by arrival: every waiting call is owed an
equal part of the capacity that frees up, and calls are admitted in the order in
which what they are owed would cover their cost (the order of their *finish* in
fair queueing's virtual time, a call's size being its larger share of the budget,
inputs or bytes). So a one-image call that arrives behind hundreds of 16-image calls
is admitted next, while a 100-input call is passed only until its turn comes due:
from then on it heads the line and reserves the capacity that frees up, and no call
slips in below the bound ahead of it. A call larger than the whole budget runs when
nothing else does. More than ``max_waiting`` calls in line, or a wait that runs out,
is shed (:class:`Shed`, HTTP 429 with ``Retry-After``).

The ingress has an admitted live call give back its hold input by input
(:meth:`Ticket.adjust`) as its answers are settled, so the line moves with every
finished input, not with every finished call.

Two traffic classes (:class:`~shared.messages.Priority`) share the budget. Bulk calls
may hold the budget only up to ``live_headroom`` short of the limit, so live calls
find room at once; a live call that waits goes ahead of every waiting bulk call, and
when the line is full a live call pushes out the bulk call due last (shed).
Bulk keeps a minimum share (``bulk_min_share`` of the budget): while bulk holds less,
live calls leave that much free for it, so a flood of live work slows a backfill but
never stops it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shared.messages import Priority


@dataclass(frozen=True, slots=True)
class Cost:
    """What a call holds while it runs: inputs (images) and bytes (bodies, fetched images, tensors)."""

    inputs: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.inputs + other.inputs, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.inputs - other.inputs, self.bytes - other.bytes)

    def within(self, limit: Cost) -> bool:
        return self.inputs <= limit.inputs and self.bytes <= limit.bytes

    def scaled(self, fraction: float) -> Cost:
        """This cost times ``fraction``, rounded up."""
        return Cost(math.ceil(self.inputs * fraction), math.ceil(self.bytes * fraction))


class Shed(Exception):
    """The call was not admitted; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Waiter:
    cost: Cost
    priority: Priority
    # When the call's fair share covers its cost (virtual time), and the arrival order for ties.
    finish: tuple[float, int] = (0.0, 0)
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Line:
    """One class's waiting calls, in the order of their fair-share finish."""

    def __init__(self) -> None:
        self._waiters: list[_Waiter] = []

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[_Waiter]:
        return iter(self._waiters)

    def __contains__(self, waiter: object) -> bool:
        return waiter in self._waiters

    @property
    def head(self) -> _Waiter:
        return self._waiters[0]

    def ahead_of(self, finish: tuple[float, int]) -> bool:
        """Whether a call in line is due before ``finish``."""
        return bool(self._waiters) and self._waiters[0].finish < finish

    def add(self, waiter: _Waiter) -> None:
        bisect.insort(self._waiters, waiter, key=lambda w: w.finish)

    def pop_head(self) -> _Waiter:
        return self._waiters.pop(0)

    def pop_last(self) -> _Waiter:
        """The call due last."""
        return self._waiters.pop()

    def remove(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)


class Ticket:
    """An admitted call's hold on the budget; :meth:`release` (or ``async with``) gives it back."""

    def __init__(self, gate: AdmissionGate, cost: Cost, priority: Priority = Priority.LIVE) -> None:
        self._gate = gate
        self.cost = cost
        self.priority = priority
        self._released = False

    def adjust(self, cost: Cost) -> None:
        """Change the hold to ``cost`` once the call's real cost is known (never waits).

        Growing past the budget is allowed (the call is already running); shrinking
        lets waiting calls in.
        """
        if not self._released:
            self._gate._change(cost - self.cost, self.priority)
            self.cost = cost

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._change(Cost(0, 0) - self.cost, self.priority, running=-1)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionGate:
    """Inputs and bytes in flight on one ingress replica, with a first-come line per traffic class."""

    def __init__(
        self,
        max_inputs: int,
        max_bytes: int,
        max_wait_s: float = 5.0,
        max_waiting: int = 256,
        clock: Callable[[], float] = time.monotonic,
        bulk_min_share: float = 0.1,
        live_headroom: float = 0.25,
    ) -> None:
        if max_inputs < 1 or max_bytes < 1 or max_wait_s < 0 or max_waiting < 0:
            raise ValueError(
                "admission bounds must be positive, got "
                f"max_inputs={max_inputs}, max_bytes={max_bytes}, max_wait_s={max_wait_s}, max_waiting={max_waiting}"
            )
        for name, value in (("bulk_min_share", bulk_min_share), ("live_headroom", live_headroom)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        self.limit = Cost(max_inputs, max_bytes)
        # Bulk never holds more than this (live finds the rest free) ...
        self._bulk_limit = self.limit - self.limit.scaled(live_headroom)
        # ... and keeps this much for itself while live could take everything.
        self._bulk_share = self.limit.scaled(bulk_min_share)
        self._max_wait_s = max_wait_s
        self._max_waiting = max_waiting
        self._clock = clock
        self.held = Cost(0, 0)
        self._held: dict[Priority, Cost] = {p: Cost(0, 0) for p in Priority}
        # The most inputs and the most bytes held at once since the replica started.
        self.peak = Cost(0, 0)
        self._running = 0
        self._lines: dict[Priority, _Line] = {p: _Line() for p in Priority}
        # Fair queueing's virtual time per class: advanced, at every admission, by the
        # admitted call's share divided among the calls that were waiting for it.
        self._virtual: dict[Priority, float] = {p: 0.0 for p in Priority}
        self._arrivals = itertools.count()
        # Per class since the replica started: inputs admitted, inputs shed.
        self.admitted: dict[Priority, int] = {p: 0 for p in Priority}
        self.shed: dict[Priority, int] = {p: 0 for p in Priority}

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _anyone_ahead(self, finish: tuple[float, int], priority: Priority) -> bool:
        """A call of this class due sooner is in line (for bulk: or any live call)."""
        if priority is Priority.BULK and self._lines[Priority.LIVE]:
            return True
        return self._lines[priority].ahead_of(finish)

    def _share(self, cost: Cost) -> float:
        """A call's size: the larger of its shares of the input and the byte budget."""
        return max(cost.inputs / self.limit.inputs, cost.bytes / self.limit.bytes)

    def _fits(self, cost: Cost, priority: Priority) -> bool:
        if self._running == 0:
            return True  # a call larger than the budget runs alone
        if not (self.held + cost).within(self.limit):
            return False
        bulk_held = self._held[Priority.BULK]
        if priority is Priority.BULK:
            # Up to the bulk limit, or within bulk's own minimum share.
            return (self.held + cost).within(self._bulk_limit) or (bulk_held + cost).within(
                self._bulk_share
            )
        # Live leaves bulk's minimum share free while bulk waits below it.
        if self._lines[Priority.BULK] and not self._bulk_share.within(bulk_held):
            free_for_live = self.limit - self._bulk_share
            return (self._held[Priority.LIVE] + cost).within(free_for_live)
        return True

    def _describe(self) -> str:
        live, bulk = self._held[Priority.LIVE], self._held[Priority.BULK]
        return (
            f"{self.held.inputs} inputs and {self.held.bytes} bytes in flight "
            f"(live {live.inputs}, bulk {bulk.inputs} inputs), "
            f"limit {self.limit.inputs} inputs and {self.limit.bytes} bytes, {self.waiting} calls waiting"
        )

    def _refuse(self, message: str, cost: Cost, priority: Priority) -> Shed:
        self.shed[priority] += cost.inputs
        return Shed(f"overloaded ({priority.value}): {message}", retry_after_s=2.0)

    async def admit(
        self, cost: Cost, wait_s: float | None = None, priority: Priority = Priority.LIVE
    ) -> Ticket:
        """Hold ``cost`` for a call of class ``priority``, waiting in line up to ``min(wait_s, max_wait_s)`` s.

        Raises:
            Shed: the line is full (and, for a live call, holds no bulk call to push out),
                the wait ran out, or a live call pushed this bulk call out of the line.
        """
        if cost.inputs < 0 or cost.bytes < 0:
            raise ValueError(f"a call's cost cannot be negative, got {cost}")
        finish = (self._virtual[priority] + self._share(cost), next(self._arrivals))
        if not self._anyone_ahead(finish, priority) and self._fits(cost, priority):
            return self._take(cost, priority)
        wait = self._max_wait_s if wait_s is None else max(0.0, min(wait_s, self._max_wait_s))
        if wait <= 0:
            raise self._refuse(self._describe(), cost, priority)
        if self.waiting >= self._max_waiting:
            bulk_line = self._lines[Priority.BULK]
            if priority is Priority.BULK or not bulk_line:
                raise self._refuse(self._describe(), cost, priority)
            pushed_out = bulk_line.pop_last()  # the bulk call due last makes room for live work
            pushed_out.admitted.set_exception(
                self._refuse(
                    f"pushed out of the line by live work; {self._describe()}",
                    pushed_out.cost,
                    Priority.BULK,
                )
            )
        waiter = _Waiter(cost, priority, finish)
        self._lines[priority].add(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.admitted), wait)
        except TimeoutError:
            if (
                waiter.admitted.done() and waiter.admitted.exception() is None
            ):  # admitted as the wait ran out
                return Ticket(self, cost, priority)
            if waiter in self._lines[priority]:
                self._lines[priority].remove(waiter)
                self._wake()  # the calls behind it may fit now
                raise self._refuse(
                    f"waited {wait:.1f} s in line; {self._describe()}", cost, priority
                ) from None
            raise waiter.admitted.exception() from None  # type: ignore[misc]
        except asyncio.CancelledError:
            if (
                waiter.admitted.done()
                and not waiter.admitted.cancelled()
                and waiter.admitted.exception() is None
            ):
                self._change(Cost(0, 0) - cost, priority, running=-1)
            elif waiter in self._lines[priority]:
                self._lines[priority].remove(waiter)
                self._wake()
            raise
        return Ticket(self, cost, priority)

    def _take(self, cost: Cost, priority: Priority) -> Ticket:
        self._hold(cost, priority, sharing=len(self._lines[priority]) + 1)
        return Ticket(self, cost, priority)

    def _hold(self, cost: Cost, priority: Priority, sharing: int) -> None:
        """Count an admitted call of ``cost``, which ``sharing`` waiting calls (itself included)
        had a part in (adding never wakes anyone)."""
        self.admitted[priority] += cost.inputs
        self._virtual[priority] += self._share(cost) / sharing
        self._change(cost, priority, running=1)

    def _change(self, delta: Cost, priority: Priority, running: int = 0) -> None:
        self.held = self.held + delta
        self._held[priority] = self._held[priority] + delta
        self._running += running
        self._note_peak()
        if delta.inputs < 0 or delta.bytes < 0 or running < 0:
            self._wake()

    def _wake(self) -> None:
        """Admit waiting calls while they fit: the live line's head first, then the bulk line's
        (a head that does not fit holds what frees up: nobody behind it passes)."""
        for priority in (Priority.LIVE, Priority.BULK):
            line = self._lines[priority]
            while line and (priority is Priority.LIVE or not self._lines[Priority.LIVE]):
                waiter = line.head
                if waiter.admitted.done():  # pushed out meanwhile
                    line.pop_head()
                    continue
                if not self._fits(waiter.cost, priority):
                    break
                sharing = len(line)
                line.pop_head()
                self._hold(waiter.cost, priority, sharing)
                waiter.admitted.set_result(None)

    def _note_peak(self) -> None:
        self.peak = Cost(max(self.peak.inputs, self.held.inputs), max(self.peak.bytes, self.held.bytes))

    def snapshot(self) -> dict[str, object]:
        """Held, peak and limit (inputs and bytes), calls waiting, and per class what is held,
        waiting, admitted and shed, for ``/v1/admission`` (``triggerfish submit`` paces on it)."""
        return {
            "inputs": self.held.inputs, "bytes": self.held.bytes,
            "peak_inputs": self.peak.inputs, "peak_bytes": self.peak.bytes,
            "max_inputs": self.limit.inputs, "max_bytes": self.limit.bytes,
            "waiting": self.waiting,
            "classes": {
                p.value: {
                    "inputs": self._held[p].inputs, "bytes": self._held[p].bytes,
                    "waiting": len(self._lines[p]), "admitted_inputs": self.admitted[p], "shed_inputs": self.shed[p],
                }
                for p in Priority
            },
        }  # fmt: skip


__all__ = ["AdmissionGate", "Cost", "Shed", "Ticket"]
